package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/csi-composefs/csi-composefs/internal/testoci"
	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

type tarEntry = testoci.Entry

var (
	dirE     = testoci.Dir
	fileE    = testoci.File
	linkE    = testoci.Link
	symlinkE = testoci.Symlink
)

func layerTar(t testing.TB, ents []tarEntry) []byte { return testoci.Layer(t, ents) }

func testImage(t testing.TB, layers ...[]byte) v1.Image { return testoci.Image(t, layers...) }

func pushImage(t testing.TB, host, repo string, img v1.Image) {
	testoci.Push(t, host, repo, img, "", "")
}

func convert(t *testing.T, s *fetch.Store, reg *testRegistry, repo string) (cfs.Digest, error) {
	t.Helper()
	ref, err := ParseReference("docker://" + reg.host + "/" + repo)
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewClient(ref, Options{Insecure: []string{reg.host}})
	if err != nil {
		t.Fatal(err)
	}
	src := NewImageSource(c, ref, ConvertLimits{})
	d, err := s.EnsureImage(context.Background(), src, fetch.ImageRef{Name: ref.Name()})
	if err != nil {
		return d, err
	}
	_, err = s.EnsureObjects(context.Background(), src, d)
	return d, err
}

func readImage(t *testing.T, s *fetch.Store, d cfs.Digest) *cfs.Image {
	t.Helper()
	b, err := os.ReadFile(s.ImagePath(d))
	if err != nil {
		t.Fatal(err)
	}
	img, err := cfs.Open(bytes.NewReader(b), int64(len(b)), cfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func TestConvertLayers(t *testing.T) {
	big := strings.Repeat("0123456789abcdef", 8<<10) // 128 KiB
	l1 := layerTar(t, []tarEntry{
		dirE("usr/"), dirE("usr/bin/"), dirE("etc/"), dirE("run/"), dirE("data/"), dirE("data/old/"),
		fileE("usr/bin/tool", big),
		{Name: "usr/bin/ping", Type: tar.TypeReg, Mode: 0o4755, Body: big + "ping",
			Xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02", "user.note": "dropped"}},
		fileE("etc/removed", "gone soon"),
		fileE("etc/small", "tiny"),
		fileE("run/pid", "123"),
		fileE("data/old/a", big+"a"),
		fileE("data/old/b", "b"),
		fileE("data/keep", big+"keep"),
	})
	l2 := layerTar(t, []tarEntry{
		{Name: "usr/", Type: tar.TypeDir, Mode: 0o750, Mtime: 99},
		fileE("etc/.wh.removed", ""),
		fileE("data/old/.wh..wh..opq", ""),
		fileE("data/old/c", big+"c"),
		linkE("usr/bin/tool2", "usr/bin/tool"),
		symlinkE("usr/bin/sh", "tool"),
	})
	l3 := layerTar(t, []tarEntry{
		fileE("usr/bin/tool", big+"new"), // tool2 keeps the old content
		fileE("data/keep", big+"keep"),   // same content again
	})
	reg := newTestRegistry(t)
	pushImage(t, reg.host, "app:1", testImage(t, l1, l2, l3))
	s := openStore(t)
	d, err := convert(t, s, reg, "app:1")
	if err != nil {
		t.Fatal(err)
	}
	img := readImage(t, s, d)
	root := img.Root()
	if root.Mode&0o7777 != 0o750 || root.Mtime.Sec != 1700000099 {
		t.Errorf("root: mode %o mtime %d, want /usr's (0750, 1700000099)", root.Mode&0o7777, root.Mtime.Sec)
	}
	obj := func(p string) []byte {
		t.Helper()
		n, err := img.Lookup(p)
		if err != nil || n == nil {
			t.Fatalf("%s: missing (%v)", p, err)
		}
		n = n.Target()
		if n.Content != nil {
			return n.Content
		}
		if n.Digest == nil {
			t.Fatalf("%s: no content", p)
		}
		b, err := os.ReadFile(s.ObjectsDir() + "/" + n.Digest.ObjectPath())
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for p, want := range map[string]string{
		"/usr/bin/tool": big + "new", "/usr/bin/tool2": big, "/data/old/c": big + "c",
		"/etc/small": "tiny", "/data/keep": big + "keep", "/usr/bin/ping": big + "ping",
	} {
		if got := obj(p); string(got) != want {
			t.Errorf("%s: %d bytes, want %d", p, len(got), len(want))
		}
	}
	for _, p := range []string{"/etc/removed", "/data/old/a", "/data/old/b", "/run/pid"} {
		if n, _ := img.Lookup(p); n != nil {
			t.Errorf("%s is still there", p)
		}
	}
	ping, _ := img.Lookup("/usr/bin/ping")
	if _, ok := ping.Xattr("security.capability"); !ok || len(ping.Xattrs) != 1 || ping.Mode&0o7777 != 0o4755 {
		t.Errorf("/usr/bin/ping: xattrs %v mode %o, want only security.capability and 4755", ping.Xattrs, ping.Mode&0o7777)
	}
	if sh, _ := img.Lookup("/usr/bin/sh"); sh == nil || sh.Payload != "tool" {
		t.Errorf("/usr/bin/sh: want a symlink to tool")
	}

	// Deterministic: converting again in another store gives the same digest.
	s2 := openStore(t)
	d2, err := convert(t, s2, reg, "app:1")
	if err != nil || d2 != d {
		t.Fatalf("second conversion: %s, %v; want %s", d2, err, d)
	}
	// `oci digest` gives it without storing anything.
	ref, _ := ParseReference("docker://" + reg.host + "/app:1")
	c, _ := NewClient(ref, Options{Insecure: []string{reg.host}})
	if d3, err := ConvertedDigest(context.Background(), NewImageSource(c, ref, ConvertLimits{})); err != nil || d3 != d {
		t.Fatalf("ConvertedDigest: %s, %v; want %s", d3, err, d)
	}
}

func TestConvertRefusesHostileLayers(t *testing.T) {
	for _, tc := range []struct {
		name string
		ents []tarEntry
	}{
		{"absolute path", []tarEntry{fileE("/etc/passwd", "x")}},
		{"dot-dot", []tarEntry{dirE("a/"), fileE("a/../../escape", "x")}},
		{"link to a missing entry", []tarEntry{linkE("l", "nope")}},
		{"link to a later entry", []tarEntry{linkE("l", "f"), fileE("f", "x")}},
		{"device node", []tarEntry{{Name: "null", Type: tar.TypeChar, Mode: 0o666}}},
		{"missing parent", []tarEntry{fileE("no/such/dir/f", "x")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newTestRegistry(t)
			pushImage(t, reg.host, "bad:1", testImage(t, layerTar(t, tc.ents)))
			s := openStore(t)
			_, err := convert(t, s, reg, "bad:1")
			if !errors.Is(err, fetch.ErrInvalidImage) || fetch.IsTransient(err) {
				t.Fatalf("got %v, want a final ErrInvalidImage", err)
			}
			t.Log(err)
			assertEmptyStore(t, s)
		})
	}
}

// assertEmptyStore fails when the store holds any image, object or
// temporary file.
func assertEmptyStore(t *testing.T, s *fetch.Store) {
	t.Helper()
	for _, d := range []string{"images", "objects", "tmp"} {
		_ = walkFiles(s.Root()+"/"+d, func(p string) { t.Errorf("left in the store: %s", p) })
	}
}

func walkFiles(dir string, fn func(string)) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		p := dir + "/" + e.Name()
		if e.IsDir() {
			walkFiles(p, fn)
		} else {
			fn(p)
		}
	}
	return nil
}

func TestConvertMissingPlatform(t *testing.T) {
	reg := newTestRegistry(t)
	img := testImage(t, layerTar(t, []tarEntry{dirE("usr/")}))
	ix := mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: img,
		Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "s390x"}}})
	testoci.PushIndex(t, reg.host, "multi:1", ix)
	s := openStore(t)
	_, err := convert(t, s, reg, "multi:1")
	if !errors.Is(err, fetch.ErrNotFound) || !strings.Contains(err.Error(), "linux/s390x") {
		t.Fatalf("got %v, want ErrNotFound naming the platforms the image has", err)
	}
}
