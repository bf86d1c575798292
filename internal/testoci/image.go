package testoci

import (
	"archive/tar"
	"bytes"
	"io"
	"runtime"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/compression"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Entry is one entry of a test layer.
type Entry struct {
	Name   string
	Type   byte
	Body   string
	Mode   int64
	Link   string
	Xattrs map[string]string
	Mtime  int64 // seconds after a fixed time
	UID    int
}

// Dir, File, Link and Symlink make common entries.
func Dir(n string) Entry          { return Entry{Name: n, Type: tar.TypeDir, Mode: 0o755} }
func File(n, body string) Entry   { return Entry{Name: n, Type: tar.TypeReg, Mode: 0o644, Body: body} }
func Link(n, target string) Entry { return Entry{Name: n, Type: tar.TypeLink, Link: target} }
func Symlink(n, target string) Entry {
	return Entry{Name: n, Type: tar.TypeSymlink, Link: target, Mode: 0o777}
}

// BaseTime is the mtime of entries with Mtime 0.
const BaseTime = 1700000000

// Layer writes the entries as an uncompressed tar.
func Layer(t testing.TB, ents []Entry) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range ents {
		h := &tar.Header{Name: e.Name, Typeflag: e.Type, Mode: e.Mode, Linkname: e.Link, Size: int64(len(e.Body)),
			ModTime: time.Unix(BaseTime+e.Mtime, 0), Uid: e.UID, Gid: e.UID, Format: tar.FormatPAX}
		if e.Type != tar.TypeReg {
			h.Size = 0
		}
		if len(e.Xattrs) > 0 {
			h.PAXRecords = map[string]string{}
			for k, v := range e.Xattrs {
				h.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			if _, err := tw.Write([]byte(e.Body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// Image builds an OCI image of the layers for linux and this process's
// architecture; the layers are gzip, zstd and uncompressed in turn.
func Image(t testing.TB, layers ...[]byte) v1.Image {
	t.Helper()
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	for i, raw := range layers {
		raw := raw
		opener := func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil }
		var opts []tarball.LayerOption
		switch i % 3 {
		case 1:
			opts = append(opts, tarball.WithCompression(compression.ZStd), tarball.WithMediaType(types.OCILayerZStd))
		case 2:
			opts = append(opts, tarball.WithMediaType(types.OCILayer))
		}
		l, err := tarball.LayerFromOpener(opener, opts...)
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			t.Fatal(err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	return img
}

// Push writes img to host/repo (plain HTTP) with optional basic auth.
func Push(t testing.TB, host, repo string, img v1.Image, user, pass string) {
	t.Helper()
	ref, err := name.ParseReference(host+"/"+repo, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	auth := authn.Anonymous
	if user != "" {
		auth = &authn.Basic{Username: user, Password: pass}
	}
	if err := remote.Write(ref, img, remote.WithAuth(auth)); err != nil {
		t.Fatal(err)
	}
}

// PushIndex writes an index to host/repo.
func PushIndex(t testing.TB, host, repo string, ix v1.ImageIndex) {
	t.Helper()
	ref, err := name.ParseReference(host+"/"+repo, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(ref, ix); err != nil {
		t.Fatal(err)
	}
}
