package fetch

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// gcOptions make GC remove every unpinned image and object at once.
func gcOptions() Options {
	o := testOptions()
	o.MaxSize, o.GCGrace = 1, time.Nanosecond
	return o
}

func flipByte(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x40
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestPinKeepsObjectsOfQuarantinedImage: a pinned image that Verify
// quarantines keeps its objects through a GC that would remove everything
// else; once unpinned they go.
func TestPinKeepsObjectsOfQuarantinedImage(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 101, 5, 20000)
	writeRepoImage(t, repo, "a.cfs", files)
	ts := newTestServer(t, repo)
	root := t.TempDir()
	s := openStore(t, root, gcOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	d := mustPull(t, s, src, "a.cfs")
	s.Pin(d)
	flipByte(t, s.ImagePath(d))
	rep, err := s.Verify(ctx)
	if err != nil || len(rep.Corrupt) != 1 || !strings.HasPrefix(rep.Corrupt[0].Path, imagesDir) {
		t.Fatalf("verify: %+v, %v; want the image quarantined", rep, err)
	}
	time.Sleep(time.Millisecond)
	if st, err := s.GC(ctx); err != nil || st.ObjectsRemoved != 0 {
		t.Fatalf("GC with the quarantined image pinned: %+v, %v", st, err)
	}
	if !hasObjects(t, root, files) {
		t.Fatal("objects of a pinned image were removed")
	}
	s.Unpin(d)
	if st, err := s.GC(ctx); err != nil || st.ObjectsRemoved != len(files) {
		t.Fatalf("GC after unpinning: %+v, %v; want every object removed", st, err)
	}
}

// TestPinOfUnknownImageKeepsEverything: after a restart, a pinned image
// whose file is gone before this process read it has an unknown object
// list: GC then removes no object at all.
func TestPinOfUnknownImageKeepsEverything(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 103, 4, 20000)
	writeRepoImage(t, repo, "a.cfs", files)
	ts := newTestServer(t, repo)
	root := t.TempDir()
	s := openStore(t, root, gcOptions())
	ctx := context.Background()
	d := mustPull(t, s, newSource(t, ts.URL, HTTPOptions{}), "a.cfs")
	s.Close()
	s = openStore(t, root, gcOptions())
	s.Pin(d) // as the driver's Recover does for a mount it finds
	if err := os.Rename(s.ImagePath(d), filepath.Join(root, quarantineDir, "gone")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Millisecond)
	if st, err := s.GC(ctx); err != nil || st.ObjectsRemoved != 0 {
		t.Fatalf("GC with a pinned image of unknown objects: %+v, %v; want nothing removed", st, err)
	}
	if !hasObjects(t, root, files) {
		t.Fatal("objects removed")
	}
	s.Unpin(d)
	if st, err := s.GC(ctx); err != nil || st.ObjectsRemoved != len(files) {
		t.Fatalf("GC after unpinning: %+v, %v", st, err)
	}
}

// failingFile fails reads with err.
type failingFile struct {
	*os.File
	err error
}

func (f failingFile) Read([]byte) (int, error)          { return 0, f.err }
func (f failingFile) ReadAt([]byte, int64) (int, error) { return 0, f.err }

// injectIOErrors makes s fail to open paths in openErr, and to read paths
// in readErr, with the given errors.
func injectIOErrors(s *Store, openErr, readErr map[string]error) {
	s.open = func(path string) (storeFile, error) {
		if err, ok := openErr[path]; ok {
			return nil, &os.PathError{Op: "open", Path: path, Err: err}
		}
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		if err, ok := readErr[path]; ok {
			return failingFile{f, &os.PathError{Op: "read", Path: path, Err: err}}, nil
		}
		return f, nil
	}
}

// TestVerifyLeavesUnreadableFiles: a file Verify cannot open (EMFILE) or
// read (EIO) is reported and stays; only wrong content is quarantined.
func TestVerifyLeavesUnreadableFiles(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 105, 4, 20000)
	writeRepoImage(t, repo, "a.cfs", files)
	ts := newTestServer(t, repo)
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	ctx := context.Background()
	d := mustPull(t, s, newSource(t, ts.URL, HTTPOptions{}), "a.cfs")
	obj := s.objectPath(cfs.VerityDigestOf(files[0].data))
	injectIOErrors(s, map[string]error{s.ImagePath(d): syscall.EMFILE}, map[string]error{obj: syscall.EIO})
	rep, err := s.Verify(ctx)
	if err == nil || !errors.Is(err, syscall.EMFILE) && !errors.Is(err, syscall.EIO) {
		t.Errorf("verify with unreadable files: %v, want the I/O error", err)
	}
	if len(rep.Corrupt) != 0 || len(rep.Unreadable) != 2 || s.Counters().Quarantined != 0 {
		t.Fatalf("report %+v, want 2 unreadable files and nothing quarantined", rep)
	}
	for _, p := range []string{s.ImagePath(d), obj} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s: %v; an unreadable file must stay", p, err)
		}
	}
	s.open = nil
	if rep, err := s.Verify(ctx); err != nil || len(rep.Corrupt) != 0 || len(rep.Unreadable) != 0 {
		t.Fatalf("verify once readable: %+v, %v", rep, err)
	}
}

// TestGCKeepsImageItCannotRead: an image GC cannot read (EIO while
// parsing) is an error, not an invalid image: it is not quarantined and its
// objects stay.
func TestGCKeepsImageItCannotRead(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 107, 4, 20000)
	writeRepoImage(t, repo, "a.cfs", files)
	ts := newTestServer(t, repo)
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	d := mustPull(t, s, newSource(t, ts.URL, HTTPOptions{}), "a.cfs")
	s.Close()
	s = openStore(t, root, testOptions()) // nothing indexed yet
	injectIOErrors(s, nil, map[string]error{s.ImagePath(d): syscall.EIO})
	if _, err := s.GC(context.Background()); !errors.Is(err, syscall.EIO) {
		t.Errorf("GC: %v, want the read error", err)
	}
	if !s.HasImage(d) || !hasObjects(t, root, files) || s.Counters().Quarantined != 0 {
		t.Fatal("GC quarantined or removed content it could not read")
	}
}
