package fetch

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

func TestLimitDefaults(t *testing.T) {
	var o Options
	o.setDefaults()
	if o.MaxImageSize != 128<<20 || o.MinRate != 16<<10 || o.MaxConcurrentDownloads != 256 || o.Parallelism != 256 || o.MaxFetchWorkers != 1024 {
		t.Fatalf("defaults %+v", o)
	}
	o = Options{MinRate: -1}
	o.setDefaults()
	if o.MinRate != 0 {
		t.Fatalf("negative MinRate became %d", o.MinRate)
	}
}

// An image with more inodes than MaxImageInodes is refused and not kept.
func TestImageInodeLimit(t *testing.T) {
	repo := t.TempDir()
	writeRepoImage(t, repo, "a.cfs", makeFiles("f", 1, 10, 1000))
	ts := newTestServer(t, repo)
	root := t.TempDir()
	opts := testOptions()
	opts.MaxImageInodes = 100 // the superblock counts 256 whiteouts too
	s := openStore(t, root, opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	_, err := s.EnsureImage(context.Background(), src, ImageRef{Name: "a.cfs"})
	if !errors.Is(err, ErrInvalidImage) || !errors.Is(err, cfs.ErrUnsupported) || !strings.Contains(err.Error(), "limit of 100") {
		t.Fatalf("got %v, want the inode limit", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(root, "images")); len(ents) != 0 {
		t.Fatalf("image kept: %v", ents)
	}
	checkInvariant(t, root)
}

// The meter, on a fake clock: a trickle of one byte every 59s over a 60s
// window is too slow; a steady rate above the minimum is not; nothing is
// judged before a whole window.
func TestRateMeter(t *testing.T) {
	t0 := time.Unix(1700000000, 0)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	const window = 60 * time.Second

	m := newRateMeter(t0, window, 16<<10)
	for i := time.Duration(1); i < 10; i++ {
		m.add(at(i*59*time.Second), 1)
		if slow, _, _ := m.check(at(i * 59 * time.Second)); slow != (i*59*time.Second >= window) {
			t.Fatalf("trickle at %v: slow=%v", i*59*time.Second, slow)
		}
	}

	m = newRateMeter(t0, window, 16<<10)
	for s := time.Duration(0); s < 300; s++ {
		m.add(at(s*time.Second), 20<<10)
		if slow, got, span := m.check(at(s*time.Second + time.Second/2)); slow {
			t.Fatalf("20 KiB/s judged slow at %ds: %d bytes in %v", s, got, span)
		}
	}
	// Then it stops: slow once the window averages under the minimum.
	if slow, _, _ := m.check(at(305 * time.Second)); slow {
		t.Fatal("slow 5s after the last byte")
	}
	if slow, _, _ := m.check(at(300*time.Second + window/2)); !slow {
		t.Fatal("not slow with half a window at 20 KiB/s (10 KiB/s on average)")
	}
	if slow, got, _ := m.check(at(300*time.Second + 2*window)); !slow || got != 0 {
		t.Fatalf("idle for two windows: slow=%v got=%d", slow, got)
	}

	// Without a minimum rate only an empty window is too slow.
	m = newRateMeter(t0, window, 0)
	m.add(at(50*time.Second), 1)
	if slow, _, _ := m.check(at(100 * time.Second)); slow {
		t.Fatal("one byte in the window, no minimum rate: slow")
	}
	if slow, _, _ := m.check(at(200 * time.Second)); !slow {
		t.Fatal("no byte for more than a window: not slow")
	}
	if slow, _, _ := newRateMeter(t0, window, 1<<30).check(at(window - 1)); slow {
		t.Fatal("judged before a whole window")
	}
}

// A server trickling bytes (never idle for StallTimeout) fails each attempt
// as too slow, and the retries are bounded.
func TestTrickleIsTooSlow(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 5, 1, 3000)
	d := writeRepoImage(t, repo, "a.cfs", files)
	data := files[0].data
	ts := newTestServer(t, repo)
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if !strings.HasPrefix(r.URL.Path, "/objects/") {
			return false
		}
		w.Header().Set("Content-Length", fmt.Sprint(len(data)))
		w.WriteHeader(http.StatusOK)
		for i := range data {
			if _, err := w.Write(data[i : i+1]); err != nil {
				return true
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return true
			case <-time.After(10 * time.Millisecond):
			}
		}
		return true
	})
	root := t.TempDir()
	opts := testOptions()
	opts.Retries = 1
	opts.StallTimeout = 100 * time.Millisecond
	opts.MinRate = 1 << 20
	s := openStore(t, root, opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "a.cfs"}); err != nil {
		t.Fatal(err)
	}
	// Only the object's retries count (on a loaded machine the image's
	// fetch may have been retried too).
	retriesBefore := s.Counters().Retries
	_, err := s.EnsureObjects(ctx, src, d)
	if err == nil || !strings.Contains(err.Error(), "bytes/s") || !strings.Contains(err.Error(), "gave up after 2 attempts") {
		t.Fatalf("got %v, want too slow after 2 attempts", err)
	}
	if hits := ts.objectHits(); len(hits) != 1 {
		t.Fatalf("object requests %v", hits)
	}
	for _, n := range ts.objectHits() {
		if n != 2 {
			t.Fatalf("%d attempts, want 2", n)
		}
	}
	if n := s.Counters().Retries - retriesBefore; n != 1 {
		t.Fatalf("retries of the object %d, want 1", n)
	}
	checkInvariant(t, root)
}

// MaxConcurrentDownloads bounds object downloads across EnsureObjects calls,
// and downloads do overlap up to it: the first requests are held until
// limit of them run at once (or more, a bug), so a store that never
// overlaps downloads fails too.
func TestNodeWideDownloadCap(t *testing.T) {
	repo := t.TempDir()
	a := makeFiles("a", 11, 10, 2000)
	b := makeFiles("b", 12, 10, 2000)
	da := writeRepoImage(t, repo, "a.cfs", a)
	db := writeRepoImage(t, repo, "b.cfs", b)
	ts := newTestServer(t, repo)
	const limit = 2
	var (
		mu      sync.Mutex
		cur     int
		maxSeen int
		full    = make(chan struct{}) // closed when limit run at once
		more    = make(chan struct{}) // closed when limit+1 run at once
		gaveUp  = make(chan struct{}) // closed when a request waited in vain
		once    sync.Once
	)
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if !strings.HasPrefix(r.URL.Path, "/objects/") {
			return false
		}
		mu.Lock()
		cur++
		if cur > maxSeen {
			maxSeen = cur
			switch maxSeen {
			case limit:
				close(full)
			case limit + 1:
				close(more)
			}
		}
		mu.Unlock()
		// Hold the request until limit overlap (then briefly, to give a
		// bug the chance to start one more), or until more than the limit
		// overlap (a bug). A store that downloads fewer at once gets there
		// only by the timeout, and fails below.
		select {
		case <-full:
			select {
			case <-more:
			case <-time.After(5 * time.Millisecond):
			}
		case <-more:
		case <-gaveUp:
		case <-time.After(10 * time.Second):
			once.Do(func() { close(gaveUp) })
		}
		mu.Lock()
		cur--
		mu.Unlock()
		return false
	})
	opts := testOptions()
	opts.MaxConcurrentDownloads = limit
	s := openStore(t, t.TempDir(), opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	for _, name := range []string{"a.cfs", "b.cfs"} {
		if _, err := s.EnsureImage(ctx, src, ImageRef{Name: name}); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, d := range []cfs.Digest{da, db} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = s.EnsureObjects(ctx, src, d)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if maxSeen != limit {
		t.Fatalf("at most %d object downloads ran at once, want exactly the limit %d", maxSeen, limit)
	}
	if len(ts.objectHits()) != 20 {
		t.Fatalf("%d objects requested", len(ts.objectHits()))
	}
}
