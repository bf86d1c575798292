package cfs

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// FuzzOpenImage feeds arbitrary bytes to the reader. Open must either fail
// with one of the reader's sentinel errors or return an image whose tree can
// be dumped, listed and looked up without panics; DumpImage must refuse
// what Open refuses, with the same error, and write what WriteDump writes of
// the tree otherwise. The seeds are every golden image.
func FuzzOpenImage(f *testing.F) {
	paths, err := filepath.Glob(filepath.Join(goldenDir(f), "*.cfs"))
	if err != nil || len(paths) == 0 {
		f.Fatalf("no golden images: %v", err)
	}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, opts := range []OpenOptions{{AllowForeignRedirects: true, AllowUnreadableFiles: true}, {}} {
			img, err := Open(bytes.NewReader(data), int64(len(data)), opts)
			rdCheckDumpImage(t, data, opts, img, err)
			if err != nil {
				if !rdIsReaderError(err) {
					t.Fatalf("Open error wraps no sentinel: %v", err)
				}
				if img != nil {
					t.Fatal("Open returned an image and an error")
				}
				continue
			}
			rdFuzzCheckImage(t, img)
		}
	})
}

func rdFuzzCheckImage(t *testing.T, img *Image) {
	root := img.Root()
	if root == nil || !root.IsDir() {
		t.Fatal("root is not a directory")
	}
	if m := img.Stats().Memory; m <= 0 || m > MaxMemoryPerByte*img.Size() {
		t.Fatalf("memory estimate %d for an image of %d bytes: not within (0, %d per byte]", m, img.Size(), MaxMemoryPerByte)
	}
	objs := img.Objects()
	for i := 1; i < len(objs); i++ {
		if objs[i-1].Path >= objs[i].Path {
			t.Fatalf("objects not sorted/unique: %q, %q", objs[i-1].Path, objs[i].Path)
		}
	}
	if err := WriteDump(io.Discard, root); err != nil {
		t.Fatal(err)
	}
	if err := WriteList(io.Discard, root, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := img.Inode(img.RootNid()); err != nil {
		t.Fatalf("Inode(root) after a successful Open: %v", err)
	}
	n := 0
	root.Walk(func(node *Node) error {
		if n++; n > 2000 {
			return io.EOF
		}
		got, err := img.Lookup(node.Path())
		if err != nil || got != node {
			t.Fatalf("Lookup(%q) = %v, %v", node.Path(), got, err)
		}
		if _, ok := img.Nid(node); !ok {
			t.Fatalf("no nid for %q", node.Path())
		}
		return nil
	})
	_ = img.Stats()
}
