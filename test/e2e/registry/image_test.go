package registry

import (
	"archive/tar"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
)

// entry is one tar entry of a test layer.
type entry struct {
	name, body, link string
	typ              byte
	mode             int64
	xattrs           map[string]string
}

func dir(n string) entry          { return entry{name: n, typ: tar.TypeDir, mode: 0o755} }
func file(n, body string) entry   { return entry{name: n, body: body, typ: tar.TypeReg, mode: 0o644} }
func hardlink(n, to string) entry { return entry{name: n, link: to, typ: tar.TypeLink} }
func symlink(n, to string) entry  { return entry{name: n, link: to, typ: tar.TypeSymlink, mode: 0o777} }
func whiteout(n string) entry {
	return file(filepath.Join(filepath.Dir(n), ".wh."+filepath.Base(n)), "")
}
func opaque(dir string) entry         { return file(filepath.Join(dir, ".wh..wh..opq"), "") }
func withMode(e entry, m int64) entry { e.mode = m; return e }

// layerFile writes the entries as a tar file (what `crane append -f`
// takes) and returns its path.
func layerFile(t *testing.T, ents []entry) string {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "layer-*.tar")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link, ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		for k, v := range e.xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

// craneOpts reach the registry as crane's users do: its CA, basic auth.
func (r *distRegistry) craneOpts() []crane.Option {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(r.caPEM)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	return []crane.Option{crane.WithTransport(tr), crane.WithAuth(&authn.Basic{Username: r.user, Password: r.pass})}
}

// pushImage builds an image of the layers with crane (crane append: gzip
// layers, one after the other) for linux/arch and pushes it as ref.
func (r *distRegistry) pushImage(t *testing.T, ref, arch string, layers ...[]entry) v1.Image {
	t.Helper()
	var paths []string
	for _, l := range layers {
		paths = append(paths, layerFile(t, l))
	}
	img, err := crane.Append(empty.Image, paths...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", arch
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	if err := crane.Push(img, r.host+"/"+ref, r.craneOpts()...); err != nil {
		t.Fatal(err)
	}
	return img
}

// storeLeftovers lists the regular files under a store's objects, images
// and tmp folders: what a refused publish must not leave.
func storeLeftovers(t *testing.T, store string) []string {
	t.Helper()
	var left []string
	for _, d := range []string{"objects", "images", "tmp"} {
		_ = filepath.Walk(filepath.Join(store, d), func(p string, fi os.FileInfo, err error) error {
			if err == nil && fi.Mode().IsRegular() {
				left = append(left, strings.TrimPrefix(p, store+"/"))
			}
			return nil
		})
	}
	return left
}

// TestContainerImageThroughDistribution builds a plain container image
// with crane (several layers: whiteouts, an opaque directory, hard links,
// xattrs, a 100 MiB file), pushes it to distribution (TLS, htpasswd),
// publishes it through the plugin with a pull secret and compares every
// file with the tree the layers describe; `oci digest` prints the digest
// the plugin converts to, and a wrong pin is refused.
func TestContainerImageThroughDistribution(t *testing.T) {
	needBinary(t)
	reg := newDistRegistry(t)
	t0 := time.Now()
	big := string(randomBytes(100<<20, 42))
	mid := string(randomBytes(300<<10, 7))
	cap := map[string]string{"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", "user.dropped": "x"}
	l1 := []entry{
		dir("usr/"), dir("usr/bin/"), dir("usr/share/"), dir("etc/"), dir("var/"), dir("var/cache/"), dir("var/lib/"), dir("var/lib/db/"), dir("run/"),
		file("usr/bin/tool", mid),
		{name: "usr/bin/ping", body: mid + "ping", typ: tar.TypeReg, mode: 0o755, xattrs: cap},
		file("etc/old.conf", "old"),
		file("var/cache/a", mid+"a"), file("var/cache/b", "b"),
		file("var/lib/db/x", mid+"x"),
		file("run/pid", "1"),
		file("usr/share/big", big),
	}
	l2 := []entry{
		whiteout("etc/old.conf"),
		opaque("var/cache"), file("var/cache/c", mid+"c"),
		hardlink("usr/bin/tool-link", "usr/bin/tool"),
		symlink("usr/bin/sh", "tool"),
		file("etc/new.conf", "new"), hardlink("etc/new-link.conf", "etc/new.conf"),
		withMode(dir("etc/"), 0o750),
	}
	l3 := []entry{
		file("usr/bin/tool", mid+"v2"),
		whiteout("var/lib/db"),
		file("var/lib/fresh", mid+"fresh"),
	}
	reg.pushImage(t, "team/plain:1", runtime.GOARCH, l1, l2, l3)
	t.Logf("image built and pushed with crane in %v", time.Since(t0).Round(time.Millisecond))

	want := t.TempDir()
	for p, body := range map[string]string{
		"usr/bin/tool": mid + "v2", "usr/bin/tool-link": mid, "usr/bin/ping": mid + "ping", "usr/share/big": big,
		"etc/new.conf": "new", "etc/new-link.conf": "new", "var/cache/c": mid + "c", "var/lib/fresh": mid + "fresh",
	} {
		writeFile(t, filepath.Join(want, p), body)
		mode := os.FileMode(0o644)
		if p == "usr/bin/ping" {
			mode = 0o755
		}
		if err := os.Chmod(filepath.Join(want, p), mode); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"run", "usr", "usr/bin", "usr/share", "var", "var/cache", "var/lib"} {
		if err := os.MkdirAll(filepath.Join(want, d), 0o755); err != nil {
			t.Fatal(err)
		}
		_ = os.Chmod(filepath.Join(want, d), 0o755)
	}
	_ = os.Chmod(filepath.Join(want, "etc"), 0o750)
	if err := os.Symlink("tool", filepath.Join(want, "usr/bin/sh")); err != nil {
		t.Fatal(err)
	}

	ref := "docker://" + reg.host + "/team/plain:1"
	d, err := cli(t, []string{"DOCKER_CONFIG=" + reg.authDir}, "oci", "digest", "--ca-file", reg.caFile, ref)
	if err != nil {
		t.Fatal(err)
	}
	d = strings.TrimSpace(d)
	p := startPlugin(t)
	start := time.Now()
	target, err := p.publish(t, "plain", map[string]string{"image": ref, "digest": d}, reg.secrets(reg.pass))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("converted and published in %v", time.Since(start).Round(time.Millisecond))
	n := sameTree(t, target, want)
	t.Logf("%d entries match the layers' tree (digest %s)", n, d)
	if _, err := unix.Lgetxattr(filepath.Join(target, "usr/bin/ping"), "security.capability", make([]byte, 64)); err != nil {
		t.Errorf("usr/bin/ping lost security.capability: %v", err)
	}
	if _, err := unix.Lgetxattr(filepath.Join(target, "usr/bin/ping"), "user.dropped", make([]byte, 64)); err == nil {
		t.Errorf("usr/bin/ping kept user.dropped")
	}
	var a, b unix.Stat_t
	if unix.Stat(filepath.Join(target, "etc/new.conf"), &a) != nil || unix.Stat(filepath.Join(target, "etc/new-link.conf"), &b) != nil ||
		a.Ino != b.Ino || a.Nlink != 2 {
		t.Errorf("etc/new-link.conf: inode %d nlink %d, etc/new.conf inode %d: want one inode with two names", b.Ino, a.Nlink, a.Ino)
	}

	// A wrong pin is refused, finally.
	wrong := strings.Repeat("ab", 32)
	if _, err := startPlugin(t).publish(t, "pinned", map[string]string{"image": ref, "digest": wrong}, reg.secrets(reg.pass)); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("a wrong digest pin: %v, want FailedPrecondition", err)
	}
}

// TestBadContentThroughDistribution publishes what must be refused, each
// on a plugin with an empty store: the gRPC code, and nothing left in the
// store (objects, images, partial files).
func TestBadContentThroughDistribution(t *testing.T) {
	needBinary(t)
	reg := newDistRegistry(t)
	other := "s390x"
	if runtime.GOARCH == other {
		other = "arm64"
	}
	good := []entry{dir("usr/"), file("usr/a", string(randomBytes(50<<10, 1))), file("usr/b", string(randomBytes(70<<10, 2)))}
	reg.pushImage(t, "bad/escape:1", runtime.GOARCH, good, []entry{file("usr/c", string(randomBytes(9000, 3))), file("../../etc/evil", "x")})
	reg.pushImage(t, "bad/absolute:1", runtime.GOARCH, good, []entry{file("/etc/evil", "x")})
	reg.pushImage(t, "bad/dangling:1", runtime.GOARCH, good, []entry{hardlink("usr/l", "usr/missing")})
	reg.pushImage(t, "bad/device:1", runtime.GOARCH, good, []entry{{name: "usr/null", typ: tar.TypeChar, mode: 0o666}})

	// An index with another platform only.
	img := reg.pushImage(t, "bad/single:1", other, good)
	idx := mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: other}}})
	ir, err := name.ParseReference(reg.host + "/bad/platform:1")
	if err != nil {
		t.Fatal(err)
	}
	o := crane.GetOptions(reg.craneOpts()...)
	if err := remote.WriteIndex(ir, idx, o.Remote...); err != nil {
		t.Fatal(err)
	}

	// A layer changed in the registry's storage after the push.
	tampered := reg.pushImage(t, "bad/tampered:1", runtime.GOARCH, good, []entry{file("usr/big", string(randomBytes(200<<10, 4)))})
	ls, err := tampered.Layers()
	if err != nil {
		t.Fatal(err)
	}
	ld, err := ls[1].Digest()
	if err != nil {
		t.Fatal(err)
	}
	reg.flipBlobByte(t, ld.Hex)

	// An artifact whose pack was changed in the storage.
	src := sourceTree(t, 40, nil)
	artRef := "oci://" + reg.host + "/bad/artifact:1"
	_, artDigest := reg.push(t, src, artRef)
	a := reg.resolve(t, artRef)
	reg.flipBlobByte(t, a.Packs[0].Digest.Encoded())

	// An artifact manifest naming more layers than the layout allows
	// (its blobs exist: distribution accepts it).
	raw, err := crane.Manifest(reg.host+"/bad/artifact:1", reg.craneOpts()...)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	layers := m["layers"].([]any)
	for len(layers) <= oci.MaxManifestLayers {
		layers = append(layers, layers[len(layers)-1])
	}
	m["layers"] = layers
	raw, _ = json.Marshal(m)
	br, err := name.ParseReference(reg.host + "/bad/artifact:many-layers")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Put(br, rawManifest{raw, types.OCIManifestSchema1}, o.Remote...); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name  string
		vc    map[string]string
		code  codes.Code
		clean bool // nothing at all left in the store
	}{
		{"tar entry escaping the root", map[string]string{"image": "docker://" + reg.host + "/bad/escape:1"}, codes.FailedPrecondition, true},
		{"absolute tar entry", map[string]string{"image": "docker://" + reg.host + "/bad/absolute:1"}, codes.FailedPrecondition, true},
		{"hard link to a missing entry", map[string]string{"image": "docker://" + reg.host + "/bad/dangling:1"}, codes.FailedPrecondition, true},
		{"device node", map[string]string{"image": "docker://" + reg.host + "/bad/device:1"}, codes.FailedPrecondition, true},
		{"manifest over the layer limit", map[string]string{"image": "oci://" + reg.host + "/bad/artifact:many-layers"}, codes.FailedPrecondition, true},
		{"missing platform", map[string]string{"image": "docker://" + reg.host + "/bad/platform:1"}, codes.NotFound, true},
		{"layer changed in the registry", map[string]string{"image": "docker://" + reg.host + "/bad/tampered:1"}, codes.FailedPrecondition, true},
		// The image and the objects already verified may stay (content
		// named by its checked digest, as for HTTP): no partial file.
		{"pack changed in the registry", map[string]string{"image": artRef, "digest": artDigest}, codes.FailedPrecondition, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startPlugin(t)
			reg.reset()
			_, err := p.publish(t, "bad", tc.vc, reg.secrets(reg.pass))
			if status.Code(err) != tc.code {
				t.Fatalf("got %v, want %v", err, tc.code)
			}
			reqs, _ := reg.counts()
			t.Logf("%v after %d requests: %v", tc.code, reqs, err)
			for _, f := range storeLeftovers(t, p.store) {
				if tc.clean || strings.HasPrefix(f, "tmp/") {
					t.Errorf("left in the store: %s", f)
				}
			}
		})
	}
}

// flipBlobByte changes one byte in the middle of a blob in the storage.
func (r *distRegistry) flipBlobByte(t *testing.T, hex string) {
	t.Helper()
	p := filepath.Join(r.root, "docker", "registry", "v2", "blobs", "sha256", hex[:2], hex, "data")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x10
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// rawManifest is a manifest to put as it is.
type rawManifest struct {
	b  []byte
	mt types.MediaType
}

func (r rawManifest) RawManifest() ([]byte, error)        { return r.b, nil }
func (r rawManifest) MediaType() (types.MediaType, error) { return r.mt, nil }
