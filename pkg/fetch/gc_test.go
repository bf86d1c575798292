package fetch

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// TestGCKeepsPinnedAndInFlight: with a budget of 1 byte, GC running while
// one image is pinned and another is half downloaded removes neither nor
// any of their objects; once unpinned and idle, everything goes.
func TestGCKeepsPinnedAndInFlight(t *testing.T) {
	repo := t.TempDir()
	common := makeFiles("c", 41, 5, 30000)
	a := append(append([]testFile{}, common...), makeFiles("a", 42, 5, 30000)...)
	b := append(append([]testFile{}, common...), makeFiles("b", 43, 8, 30000)...)
	old := makeFiles("o", 44, 4, 30000)
	da := writeRepoImage(t, repo, "a.cfs", a)
	db := writeRepoImage(t, repo, "b.cfs", b)
	dold := writeRepoImage(t, repo, "old.cfs", old)
	ts := newTestServer(t, repo)
	root := t.TempDir()
	opts := testOptions()
	opts.MaxSize = 1
	opts.GCGrace = time.Nanosecond
	opts.Parallelism = 2
	s := openStore(t, root, opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()

	for _, d := range []cfs.Digest{da, dold} {
		if _, err := s.EnsureImage(ctx, src, ImageRef{Digest: d, Name: map[cfs.Digest]string{da: "a.cfs", dold: "old.cfs"}[d]}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.EnsureObjects(ctx, src, d); err != nil {
			t.Fatal(err)
		}
	}
	s.Pin(da)
	// An orphan object: GC always removes it.
	orphan := content(99, 5000)
	op := filepath.Join(root, "objects", cfs.VerityDigestOf(orphan).ObjectPath())
	if err := os.MkdirAll(filepath.Dir(op), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(op, orphan, 0o644); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(op); err != nil || fi.Size() != int64(len(orphan)) {
		t.Fatalf("the orphan object is not in place before GC: %v", err)
	}

	// b's objects block after the first few, so GC runs mid-download.
	release := make(chan struct{})
	var served atomic.Int32
	halfway := make(chan struct{})
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if strings.HasPrefix(r.URL.Path, "/objects/") {
			if served.Add(1) == 3 {
				close(halfway)
			}
			if served.Load() >= 3 {
				<-release
			}
		}
		return false
	})
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "b.cfs"}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := s.EnsureObjects(ctx, src, db); done <- err }()
	<-halfway

	st, err := s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("GC mid-download: %+v", st)
	if s.HasImage(dold) {
		t.Error("the unpinned idle image was kept over budget")
	}
	if !s.HasImage(da) || !s.HasImage(db) {
		t.Error("a pinned or in-flight image was removed")
	}
	if !hasObjects(t, root, a) {
		t.Error("objects of the pinned image were removed")
	}
	if _, err := os.Stat(op); !os.IsNotExist(err) {
		t.Error("the orphan object was kept")
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !hasObjects(t, root, b) {
		t.Error("objects of the in-flight image were removed")
	}
	checkInvariant(t, root)

	// Pinned a stays; idle b goes, and its own objects, but not the shared ones.
	if _, err := s.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if s.HasImage(db) || !s.HasImage(da) || !hasObjects(t, root, a) {
		t.Error("after b went idle: wrong images or objects kept")
	}
	s.Unpin(da)
	if _, err := s.GC(ctx); err != nil {
		t.Fatal(err)
	}
	u, err := DiskUsage(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	if u.Objects.Files != 0 || u.Images.Files != 0 {
		t.Errorf("after unpinning everything: %+v", u)
	}
	checkInvariant(t, root)
}

func TestGCWithoutBudgetKeepsImages(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 51, 4, 20000)
	d := writeRepoImage(t, repo, "a.cfs", files)
	ts := newTestServer(t, repo)
	root := t.TempDir()
	opts := testOptions()
	opts.GCGrace = time.Nanosecond
	s := openStore(t, root, opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if got := mustPull(t, s, src, "a.cfs"); got != d {
		t.Fatalf("pulled %s, want %s", got, d)
	}
	st, err := s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.ImagesRemoved != 0 || st.ObjectsRemoved != 0 || !hasObjects(t, root, files) {
		t.Errorf("GC without a budget removed referenced content: %+v", st)
	}
}

func TestVerifyQuarantines(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 61, 5, 20000)
	d := writeRepoImage(t, repo, "a.cfs", files)
	ts := newTestServer(t, repo)
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if got := mustPull(t, s, src, "a.cfs"); got != d {
		t.Fatalf("pulled %s, want %s", got, d)
	}
	rep, err := s.Verify(ctx)
	if err != nil || len(rep.Corrupt) != 0 || rep.Objects != 5 || rep.Images != 1 {
		t.Fatalf("clean store: %+v, %v", rep, err)
	}
	// Corrupt one object in place (same size) and drop a stray file.
	victim := filepath.Join(root, "objects", cfs.VerityDigestOf(files[1].data).ObjectPath())
	os.Chmod(victim, 0o644)
	bad := append([]byte(nil), files[1].data...)
	bad[0] ^= 1
	if err := os.WriteFile(victim, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(root, "objects", "stray"), []byte("x"), 0o644)
	rep, err = s.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Corrupt) != 2 {
		t.Fatalf("found %+v, want 2 corrupt files", rep.Corrupt)
	}
	for _, c := range rep.Corrupt {
		if _, err := os.Stat(filepath.Join(root, c.MovedTo)); err != nil {
			t.Errorf("evidence of %s not kept: %v", c.Path, err)
		}
	}
	checkInvariant(t, root)
	// The next pull fetches the quarantined object again.
	st, err := s.EnsureObjects(ctx, src, d)
	if err != nil || st.Fetched != 1 {
		t.Fatalf("re-pull: %+v, %v", st, err)
	}
	if s.Counters().Quarantined != 2 {
		t.Errorf("counters: %+v", s.Counters())
	}
}

func TestStoreLockAndTmpCleared(t *testing.T) {
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	if _, err := Open(context.Background(), root, testOptions()); err == nil {
		t.Fatal("a second Open of a store in use succeeded")
	}
	s.Close()
	os.WriteFile(filepath.Join(root, "tmp", "object-leftover"), []byte("partial"), 0o644)
	openStore(t, root, testOptions())
	checkInvariant(t, root)
}

// TestGCStress runs GC in a loop with a 1-byte budget and no grace while
// workers pin images, pull them and check that every object is there.
func TestGCStress(t *testing.T) {
	repo := t.TempDir()
	common := makeFiles("c", 141, 10, 8000)
	var imgs []cfs.Digest
	var sets [][]testFile
	for i := range 6 {
		files := append(append([]testFile{}, common...), makeFiles("u", uint64(150+i), 4, 8000)...)
		sets = append(sets, files)
		imgs = append(imgs, writeRepoImage(t, repo, "img"+string(rune('0'+i))+".cfs", files))
	}
	ts := newTestServer(t, repo)
	root := t.TempDir()
	opts := testOptions()
	opts.MaxSize = 1
	opts.GCGrace = time.Nanosecond
	s := openStore(t, root, opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()

	stop := make(chan struct{})
	gcDone := make(chan error, 1)
	var gcRuns atomic.Int32
	go func() {
		for {
			select {
			case <-stop:
				gcDone <- nil
				return
			default:
			}
			if _, err := s.GC(ctx); err != nil {
				gcDone <- err
				return
			}
			gcRuns.Add(1)
		}
	}()
	errs := make(chan error, 8)
	for w := range 8 {
		go func() {
			for k := range 6 {
				i := (w + k) % 6
				d := imgs[i]
				s.Pin(d) // the digest is known: pin before fetching
				_, err := s.EnsureImage(ctx, src, ImageRef{Name: "img" + string(rune('0'+i)) + ".cfs", Digest: d})
				if err == nil {
					_, err = s.EnsureObjects(ctx, src, d)
				}
				if err == nil && !hasObjects(t, root, sets[i]) {
					err = errors.New("objects of a pinned image missing after EnsureObjects")
				}
				s.Unpin(d)
				if err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	close(stop)
	if err := <-gcDone; err != nil {
		t.Fatal(err)
	}
	t.Logf("%d GC runs during the pulls removed %d images and %d objects", gcRuns.Load(), s.Counters().GCImagesRemoved, s.Counters().GCObjectsRemoved)
	checkInvariant(t, root)
}
