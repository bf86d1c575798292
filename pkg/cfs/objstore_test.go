package cfs

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// storeAll stores objects of the given contents through a digestStore the
// way BuildFromDir does, returning their digests.
func storeAll(t *testing.T, s *digestStore, contents [][]byte) []Digest {
	t.Helper()
	var ds []Digest
	b := &dirBuilder{store: s}
	for _, c := range contents {
		d := VerityDigestOf(c)
		ds = append(ds, d)
		if !s.claim(d, int64(len(c))) {
			continue
		}
		if err := b.storeBytes(context.Background(), d, c); err != nil {
			t.Fatal(err)
		}
	}
	return ds
}

func objectContents(n, size int) [][]byte {
	var out [][]byte
	for i := range n {
		c := pattern(size, 251)
		copy(c, fmt.Sprintf("object %d", i))
		out = append(out, c)
	}
	return out
}

// TestDigestStoreGroups: objects are made durable with one syncfs per group
// (plus one for the names at the end), not one sync per object, and none
// gets its name before its group's syncfs.
func TestDigestStoreGroups(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "objects")
	s, err := openDigestStore(dir, false)
	if err != nil {
		t.Fatal(err)
	}
	few := storeAll(t, s, objectContents(10, 5000))
	for _, d := range few {
		if _, err := os.Lstat(filepath.Join(dir, d.ObjectPath())); err == nil {
			t.Fatalf("object %s named before its group was made durable", d)
		}
	}
	const n = 2*storeGroupObjects + 10
	all := storeAll(t, s, objectContents(n, 5000))
	storeAll(t, s, objectContents(n, 5000)) // the same again: nothing more to store
	if err := s.finish(context.Background()); err != nil {
		t.Fatal(err)
	}
	total := len(few) + n
	if want := (total+storeGroupObjects-1)/storeGroupObjects + 1; s.syncs != want {
		t.Errorf("%d syncfs calls for %d objects, want %d (one per group of %d, one for the names)", s.syncs, total, want, storeGroupObjects)
	}
	for _, d := range all {
		p := filepath.Join(dir, d.ObjectPath())
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o644 {
			t.Errorf("%s: mode %o", d, fi.Mode().Perm())
		}
		if err := checkObject(p, d); err != nil {
			t.Error(err)
		}
	}
	if tmp, _ := filepath.Glob(filepath.Join(dir, ".tmp-*")); len(tmp) != 0 {
		t.Errorf("temporaries left: %v", tmp)
	}
}

// TestDigestStoreAbort: a failed build names nothing that was pending and
// leaves no temporary, with or without O_TMPFILE.
func TestDigestStoreAbort(t *testing.T) {
	for _, named := range []bool{false, true} {
		t.Run(fmt.Sprintf("named=%v", named), func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "objects")
			s, err := openDigestStore(dir, false)
			if err != nil {
				t.Fatal(err)
			}
			s.noTmpfile = named
			ds := storeAll(t, s, objectContents(20, 100))
			s.abort()
			for _, d := range ds {
				if _, err := os.Lstat(filepath.Join(dir, d.ObjectPath())); err == nil {
					t.Errorf("object %s named after an abort", d)
				}
			}
			left, _ := os.ReadDir(dir)
			if len(left) != 0 {
				t.Errorf("store holds %d entries after an abort", len(left))
			}
		})
	}
}

// TestBuildDigestStore: BuildFromDir stores each distinct content once,
// small files from memory and large ones as they are hashed, each object
// with the digest its name says.
func TestBuildDigestStore(t *testing.T) {
	src := t.TempDir()
	sizes := []int{DirInlineContentMax, DirInlineContentMax + 1, 4096, hashWorkerBuffer - 1, hashWorkerBuffer, hashWorkerBuffer + 1, 3*hashWorkerBuffer + 17}
	want := map[string]bool{}
	for i, n := range sizes {
		for copyN := range 2 { // each content twice: stored once
			p := filepath.Join(src, fmt.Sprintf("f%d-%d", i, copyN))
			c := pattern(n, 251-i)
			if err := os.WriteFile(p, c, 0o600); err != nil {
				t.Fatal(err)
			}
			if n > DirInlineContentMax {
				want[VerityDigestOf(c).ObjectPath()] = true
			}
		}
	}
	store := filepath.Join(t.TempDir(), "objects")
	for round := range 2 { // the second finds every object stored already
		root, err := BuildFromDir(context.Background(), src, DirOptions{DigestStore: store, Threads: 3})
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		var got []string
		filepath.Walk(store, func(p string, fi os.FileInfo, err error) error {
			if err == nil && !fi.IsDir() {
				rel, _ := filepath.Rel(store, p)
				got = append(got, rel)
				if err := checkObject(p, mustParseObjectPath(t, rel)); err != nil {
					t.Error(err)
				}
			}
			return err
		})
		if len(got) != len(want) {
			t.Errorf("round %d: store holds %v, want %d objects", round, got, len(want))
		}
		for _, g := range got {
			if !want[g] {
				t.Errorf("unexpected object %s", g)
			}
		}
		root.Walk(func(n *Node) error {
			if n.Digest != nil && !want[n.Payload] {
				t.Errorf("%s names %s, not stored", n.Path(), n.Payload)
			}
			return nil
		})
	}
}
