package driver

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/internal/testoci"
	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
)

// bigFileSize is the large file of the container image test: 100 MiB with
// CSI_COMPOSEFS_BIG_FILE=1, 8 MiB otherwise (CI time).
func bigFileSize() int {
	if os.Getenv("CSI_COMPOSEFS_BIG_FILE") == "1" {
		return 100 << 20
	}
	return 8 << 20
}

// randomBytes returns n bytes from a seeded generator.
func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 1))
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// writeFiles writes files (path → content) under dir.
func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for p, c := range files {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// sameTree compares every entry under got with want: type, permission
// bits, content and symlink targets.
func sameTree(t *testing.T, got, want string) {
	t.Helper()
	n := 0
	err := filepath.Walk(want, func(p string, wi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(want, p)
		gp := filepath.Join(got, rel)
		gi, err := os.Lstat(gp)
		if err != nil {
			t.Errorf("%s: %v", rel, err)
			return nil
		}
		n++
		if gi.Mode().Type() != wi.Mode().Type() || (rel != "." && gi.Mode().Perm() != wi.Mode().Perm()) {
			t.Errorf("%s: mode %v, want %v", rel, gi.Mode(), wi.Mode())
		}
		switch {
		case wi.Mode().IsRegular():
			a, err1 := os.ReadFile(gp)
			b, err2 := os.ReadFile(p)
			if err1 != nil || err2 != nil || !bytes.Equal(a, b) {
				t.Errorf("%s: content differs (%v, %v)", rel, err1, err2)
			}
		case wi.Mode()&os.ModeSymlink != 0:
			a, _ := os.Readlink(gp)
			b, _ := os.Readlink(p)
			if a != b {
				t.Errorf("%s: symlink to %q, want %q", rel, a, b)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Nothing more than the source.
	m := 0
	_ = filepath.Walk(got, func(string, os.FileInfo, error) error { m++; return nil })
	if m != n {
		t.Errorf("the volume has %d entries, the source %d", m, n)
	}
}

// TestPublishOCIArtifact pushes a directory as a composefs artifact with
// basic auth, publishes it over gRPC with a real mount and compares every
// file; wrong credentials are a final PermissionDenied after a handful of
// requests, also for content the node has.
func TestPublishOCIArtifact(t *testing.T) {
	needRoot(t)
	reg := testoci.NewRegistry(t, testoci.Options{User: "alice", Password: "s3cret"})
	src := t.TempDir()
	files := map[string]string{"etc/app.conf": "key = value\n", "bin/tiny": "x"}
	for i := 0; i < 40; i++ {
		files[fmt.Sprintf("lib/f%02d", i)] = string(randomBytes(20<<10+i*997, uint64(i)))
	}
	writeFiles(t, src, files)
	if err := os.Symlink("app.conf", filepath.Join(src, "etc/link")); err != nil {
		t.Fatal(err)
	}
	ref, err := oci.ParseReference("oci://" + reg.Host + "/team/app:v1")
	if err != nil {
		t.Fatal(err)
	}
	c, err := oci.NewClient(ref, oci.Options{Insecure: []string{reg.Host}, Username: "alice", Password: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	in, err := oci.InputFromDir(context.Background(), src, cfs.DirOptions{}, cfs.DefaultWriteOptions())
	if err != nil {
		t.Fatal(err)
	}
	res, err := oci.Push(context.Background(), c, in, oci.PushOptions{PackSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}

	e := newTestEnv(t, Config{Registries: RegistryConfig{Insecure: []string{reg.Host}}})
	node := e.grpcNode(t)
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	vc := map[string]string{"image": ref.String(), "digest": res.Digest.String()}
	req := publishReq("v", target, vc)
	req.Secrets = map[string]string{"username": "alice", "password": "s3cret"}
	if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	sameTree(t, target, src)

	// Wrong credentials: final, and no retry storm — with the content
	// already on the node too.
	for _, secrets := range []map[string]string{{"username": "alice", "password": "wrong"}, nil} {
		reg.Reset()
		other := filepath.Join(t.TempDir(), "vol")
		cleanupMounts(t, other)
		req := publishReq("w", other, vc)
		req.Secrets = secrets
		_, err := node.NodePublishVolume(context.Background(), req)
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("credentials %v: got %v, want PermissionDenied", secrets, err)
		}
		if n := reg.Counts().Requests; n > 6 {
			t.Fatalf("credentials %v: %d requests to the registry for a refusal", secrets, n)
		}
		t.Logf("credentials %v: %v (%d requests)", secrets, err, reg.Counts().Requests)
	}
	// A node without the content, and no credentials: the same.
	reg.Reset()
	e2 := newTestEnv(t, Config{Registries: RegistryConfig{Insecure: []string{reg.Host}}})
	third := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, third)
	_, err = e2.grpcNode(t).NodePublishVolume(context.Background(), publishReq("x", third, vc))
	if status.Code(err) != codes.PermissionDenied || reg.Counts().Requests > 6 {
		t.Fatalf("no credentials on a fresh node: %v after %d requests, want PermissionDenied", err, reg.Counts().Requests)
	}
}

// TestPublishContainerImage converts a container image of several layers
// (whiteouts, an opaque directory, hard links, xattrs, a large file) and
// compares the mounted volume with the tree the layers describe.
func TestPublishContainerImage(t *testing.T) {
	needRoot(t)
	reg := testoci.NewRegistry(t, testoci.Options{})
	big := string(randomBytes(bigFileSize(), 42))
	mid := string(randomBytes(300<<10, 7))
	l1 := testoci.Layer(t, []testoci.Entry{
		testoci.Dir("usr/"), testoci.Dir("usr/bin/"), testoci.Dir("etc/"), testoci.Dir("var/"), testoci.Dir("var/cache/"), testoci.Dir("run/"),
		testoci.File("usr/bin/tool", mid),
		{Name: "usr/bin/ping", Type: tar.TypeReg, Mode: 0o755, Body: mid + "ping", Xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", "user.dropped": "x"}},
		testoci.File("etc/old.conf", "old"),
		testoci.File("var/cache/a", mid+"a"),
		testoci.File("var/cache/b", "b"),
		testoci.File("run/pid", "1"),
		testoci.File("usr/big", big),
	})
	l2 := testoci.Layer(t, []testoci.Entry{
		testoci.File("etc/.wh.old.conf", ""),
		testoci.File("var/cache/.wh..wh..opq", ""),
		testoci.File("var/cache/c", mid+"c"),
		testoci.Link("usr/bin/tool-link", "usr/bin/tool"),
		testoci.Symlink("usr/bin/sh", "tool"),
		testoci.File("etc/new.conf", "new"),
	})
	l3 := testoci.Layer(t, []testoci.Entry{testoci.File("usr/bin/tool", mid+"v2")})
	testoci.Push(t, reg.Host, "app:1", testoci.Image(t, l1, l2, l3), "", "")

	// The tree the layers describe.
	want := t.TempDir()
	writeFiles(t, want, map[string]string{
		"usr/bin/tool": mid + "v2", "usr/bin/tool-link": mid, "usr/bin/ping": mid + "ping", "usr/big": big,
		"etc/new.conf": "new", "var/cache/c": mid + "c",
	})
	for _, d := range []string{"run"} {
		if err := os.MkdirAll(filepath.Join(want, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("tool", filepath.Join(want, "usr/bin/sh")); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Join(want, "usr/bin/ping"), 0o755)

	e := newTestEnv(t, Config{Registries: RegistryConfig{Insecure: []string{reg.Host}}})
	node := e.grpcNode(t)
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	vc := map[string]string{"image": "docker://" + reg.Host + "/app:1"}
	if _, err := node.NodePublishVolume(context.Background(), publishReq("v", target, vc)); err != nil {
		t.Fatal(err)
	}
	sameTree(t, target, want)
	if _, err := unix.Lgetxattr(filepath.Join(target, "usr/bin/ping"), "security.capability", make([]byte, 64)); err != nil {
		t.Errorf("usr/bin/ping lost security.capability: %v", err)
	}
	if _, err := unix.Lgetxattr(filepath.Join(target, "usr/bin/ping"), "user.dropped", make([]byte, 64)); err == nil {
		t.Errorf("usr/bin/ping kept user.dropped")
	}
	var a, b unix.Stat_t
	if unix.Stat(filepath.Join(target, "usr/bin/tool-link"), &a) != nil || a.Nlink != 1 {
		t.Errorf("usr/bin/tool-link: nlink %d (its old inode lost its first name)", a.Nlink)
	}

	// A second volume of the same image converts nothing and fetches no layer.
	reg.Reset()
	second := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, second)
	if _, err := node.NodePublishVolume(context.Background(), publishReq("v2", second, vc)); err != nil {
		t.Fatal(err)
	}
	if c := reg.Counts(); c.BlobGets > 1 {
		t.Fatalf("the second volume fetched %d blobs (%d bytes)", c.BlobGets, c.BlobBytes)
	}
	if unix.Stat(filepath.Join(second, "usr/big"), &b) != nil || b.Size != int64(len(big)) {
		t.Fatalf("second volume: usr/big has %d bytes", b.Size)
	}
	if !strings.HasPrefix(vc["image"], "docker://") {
		t.Fatal("unreachable")
	}
}
