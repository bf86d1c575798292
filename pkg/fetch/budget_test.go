package fetch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/internal/heaptest"
	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

func TestBudgetDefaults(t *testing.T) {
	var o Options
	o.setDefaults()
	if o.DownloadBudget != 1<<30 || o.ParseMemory != 256<<20 || o.MaxObjectSize != 16<<30 || o.MinFreeSpace != 1<<30 {
		t.Fatalf("defaults %+v", o)
	}
	o = Options{DownloadBudget: -1, ParseMemory: -1, MaxObjectSize: -1, MinFreeSpace: -1}
	o.setDefaults()
	if o.DownloadBudget != -1 || o.ParseMemory != -1 || o.MaxObjectSize != -1 || o.MinFreeSpace != -1 {
		t.Fatalf("none became %+v", o)
	}
}

// An image needing an object larger than MaxObjectSize (here one claiming
// 100 GiB) is refused before any object is requested, and leaves nothing;
// without the limit and the free-space check the object is requested.
func TestMaxObjectSize(t *testing.T) {
	repo := t.TempDir()
	if err := os.MkdirAll(filepath.Join(repo, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	files := makeFiles("f", 3, 3, 1000)
	d := writeRepoImageSizes(t, repo, "huge.cfs", files, func(i int) int {
		if i == 1 {
			return 100 << 30
		}
		return len(files[i].data)
	})
	for _, tc := range []struct {
		name          string
		max, minFree  int64
		wantRequested bool
	}{
		{"default limit", 0, -1, false},
		{"1 MiB limit", 1 << 20, -1, false},
		{"no limit", -1, -1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := newTestServer(t, repo)
			root := t.TempDir()
			opts := testOptions()
			opts.MaxObjectSize, opts.MinFreeSpace = tc.max, tc.minFree
			s := openStore(t, root, opts)
			src := newSource(t, ts.URL, HTTPOptions{})
			ctx := context.Background()
			if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "huge.cfs", Digest: d}); err != nil {
				t.Fatal(err)
			}
			_, err := s.EnsureObjects(ctx, src, d)
			requested := len(ts.objectHits()) > 0
			if requested != tc.wantRequested {
				t.Fatalf("objects requested: %v, want %v (%v)", requested, tc.wantRequested, err)
			}
			if !tc.wantRequested {
				big := cfs.VerityDigestOf(files[1].data)
				if !errors.Is(err, ErrResourceLimit) || !strings.Contains(err.Error(), big.String()) || !strings.Contains(err.Error(), "maximum object size") {
					t.Fatalf("got %v, want the object size limit naming %s", err, big)
				}
			}
			checkInvariant(t, root)
		})
	}
}

// mountTmpfs mounts a tmpfs of size bytes at a new directory (root only).
func mountTmpfs(t *testing.T, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d", size), "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mounting a tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmounting %s: %v", dir, err)
		}
	})
	return dir
}

// mib1Files returns n files of exactly 1 MiB.
func mib1Files(prefix string, seed uint64, n int) []testFile {
	out := make([]testFile, n)
	for i := range out {
		out[i] = testFile{name: fmt.Sprintf("%s%02d", prefix, i), data: content(seed*1000+uint64(i), 1<<20)}
	}
	return out
}

// On a 16 MiB filesystem, an image whose missing objects (6 MiB) do not
// fit beyond MinFreeSpace is refused before any object is requested
// (ENOSPC, ResourceExhausted for the driver); with a smaller reserve it is
// stored.
func TestFreeSpaceRefusedBeforeDownload(t *testing.T) {
	repo := t.TempDir()
	files := mib1Files("f", 8, 6)
	d := writeRepoImage(t, repo, "img.cfs", files)
	for _, tc := range []struct {
		minFree int64
		fits    bool
	}{{12 << 20, false}, {4 << 20, true}} {
		t.Run(fmt.Sprintf("reserve %d MiB", tc.minFree>>20), func(t *testing.T) {
			root := mountTmpfs(t, 16<<20)
			ts := newTestServer(t, repo)
			opts := testOptions()
			opts.MinFreeSpace = tc.minFree
			s := openStore(t, root, opts)
			src := newSource(t, ts.URL, HTTPOptions{})
			ctx := context.Background()
			if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "img.cfs", Digest: d}); err != nil {
				t.Fatal(err)
			}
			_, err := s.EnsureObjects(ctx, src, d)
			if tc.fits {
				if err != nil {
					t.Fatal(err)
				}
				if !hasObjects(t, root, files) {
					t.Fatal("objects missing")
				}
			} else {
				if !errors.Is(err, ErrResourceLimit) || !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "do not fit") {
					t.Fatalf("got %v, want refused for lack of free space", err)
				}
				if n := len(ts.objectHits()); n != 0 {
					t.Fatalf("%d objects requested before refusing", n)
				}
				if s.Counters().Retries != 0 {
					t.Error("refusal retried")
				}
			}
			checkInvariant(t, root)
		})
	}
}

// Two images that each fit the free space beyond the reserve but not
// together: the second passes the check before downloading (the first has
// only one object in flight then), so only the check each object download
// makes keeps the reserve free. Without it both are stored and the free
// space ends below the reserve.
func TestFreeSpaceCheckedPerDownload(t *testing.T) {
	const reserve = 6 << 20
	root := mountTmpfs(t, 16<<20)
	repo := t.TempDir()
	a, b := mib1Files("a", 21, 6), mib1Files("b", 22, 6)
	da := writeRepoImage(t, repo, "a.cfs", a)
	db := writeRepoImage(t, repo, "b.cfs", b)
	ts := newTestServer(t, repo)
	held := make(chan struct{})
	firstSeen := make(chan struct{})
	var once sync.Once
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if strings.HasPrefix(r.URL.Path, "/objects/") {
			once.Do(func() { close(firstSeen) })
			<-held
		}
		return false
	})
	opts := testOptions()
	opts.MinFreeSpace = reserve
	opts.Parallelism = 1
	s := openStore(t, root, opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	for _, name := range []string{"a.cfs", "b.cfs"} {
		if _, err := s.EnsureImage(ctx, src, ImageRef{Name: name}); err != nil {
			t.Fatal(err)
		}
	}
	errs := make(chan error, 2)
	go func() { _, err := s.EnsureObjects(ctx, src, da); errs <- err }()
	<-firstSeen
	go func() {
		// Let b pass its check before downloading, then release a.
		defer close(held)
		deadline := time.Now().Add(10 * time.Second)
		for s.Budgets().DownloadBytesReserved < 2<<20 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}()
	go func() { _, err := s.EnsureObjects(ctx, src, db); errs <- err }()
	var failed int
	for range 2 {
		if err := <-errs; err != nil {
			failed++
			if !errors.Is(err, ErrResourceLimit) || !errors.Is(err, syscall.ENOSPC) {
				t.Errorf("got %v, want refused for lack of free space", err)
			}
		}
	}
	free, err := s.freeSpace()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d of 2 images refused; %d KiB free at the end", failed, free>>10)
	if free < reserve {
		t.Fatalf("%d KiB free at the end, less than the reserve of %d KiB", free>>10, reserve>>10)
	}
	if failed == 0 {
		t.Fatal("both images stored, 12 MiB in 10 MiB")
	}
	checkInvariant(t, root)
}

// Object downloads hold at most DownloadBudget bytes at once (each
// reserves its size before its request), overlap up to it, all complete
// (over budget they wait rather than fail), and one object larger than
// the whole budget downloads alone.
func TestDownloadBudgetObjects(t *testing.T) {
	repo := t.TempDir()
	small := mib1Files("s", 31, 12)
	big := []testFile{{name: "big", data: content(32, 5<<20)}}
	ds := writeRepoImage(t, repo, "small.cfs", small)
	db := writeRepoImage(t, repo, "big.cfs", big)
	bigPath := "/objects/" + cfs.VerityDigestOf(big[0].data).ObjectPath()
	const budget = 3<<20 + 512<<10 // three 1 MiB objects
	ts := newTestServer(t, repo)
	var (
		mu       sync.Mutex
		cur, top int64
		bigWith  int64 = -1                  // bytes in flight besides the big object when it started
		full           = make(chan struct{}) // closed when 3 MiB are in flight
		over           = make(chan struct{}) // closed when more than the budget is (a bug)
		fullOnce sync.Once
		overOnce sync.Once
	)
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if !strings.HasPrefix(r.URL.Path, "/objects/") {
			return false
		}
		fi, err := os.Stat(filepath.Join(repo, filepath.FromSlash(r.URL.Path)))
		if err != nil {
			return false
		}
		mu.Lock()
		if r.URL.Path == bigPath {
			bigWith = cur
		}
		cur += fi.Size()
		if r.URL.Path != bigPath {
			top = max(top, cur)
		}
		if cur >= 3<<20 {
			fullOnce.Do(func() { close(full) })
		}
		if cur > budget {
			overOnce.Do(func() { close(over) })
		}
		mu.Unlock()
		// Hold until the budget is full, so that the downloads overlap,
		// then a little longer, so that a download over budget would start.
		select {
		case <-full:
			select {
			case <-over:
			case <-time.After(20 * time.Millisecond):
			}
		case <-over:
		case <-time.After(5 * time.Second):
		}
		http.ServeFile(w, r, filepath.Join(repo, filepath.FromSlash(r.URL.Path)))
		mu.Lock()
		cur -= fi.Size()
		mu.Unlock()
		return true
	})
	opts := testOptions()
	opts.DownloadBudget = budget
	s := openStore(t, t.TempDir(), opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	for _, name := range []string{"small.cfs", "big.cfs"} {
		if _, err := s.EnsureImage(ctx, src, ImageRef{Name: name}); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, d := range []cfs.Digest{ds, db} {
		wg.Add(1)
		go func() { defer wg.Done(); _, errs[i] = s.EnsureObjects(ctx, src, d) }()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("at most %d KiB of small objects in flight, budget %d KiB; %d downloads waited", top>>10, budget>>10, s.Budgets().DownloadWaits)
	if bigWith != 0 {
		t.Errorf("the object larger than the budget started with %d bytes of others in flight, want alone", bigWith)
	}
	if top > budget {
		t.Errorf("%d bytes in flight at once, budget %d", top, budget)
	}
	if s.Budgets().DownloadBytesReserved != 0 {
		t.Errorf("%d bytes still reserved after the downloads", s.Budgets().DownloadBytesReserved)
	}
	mu.Lock()
	defer mu.Unlock()
	select {
	case <-full:
	default:
		t.Error("small downloads never overlapped up to the budget")
	}
}

// Image downloads reserve MaxImageSize until the response announces its
// length: endless responses (no length) run at most budget/MaxImageSize at
// once, their files in tmp/ stay within the budget, and each fails at the
// size limit; responses with a length give the rest back, so that more of
// them run at once.
func TestDownloadBudgetImages(t *testing.T) {
	const maxImage = 1 << 20
	const budget = 2*maxImage + 4096 // two endless downloads
	repo := t.TempDir()
	small := writeRepoImage(t, repo, "small.cfs", makeFiles("f", 41, 2, 1000))
	smallImg, err := os.ReadFile(filepath.Join(repo, "images", "small.cfs"))
	if err != nil {
		t.Fatal(err)
	}
	ts := newTestServer(t, repo)
	var (
		mu      sync.Mutex
		arrived int
		want    int           // requests to wait for before answering
		enough  chan struct{} // closed when want arrived
		waited  bool          // a request gave up waiting for want
	)
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		endless := strings.HasPrefix(r.URL.Path, "/images/endless")
		if !endless && !strings.HasPrefix(r.URL.Path, "/images/sized") {
			return false
		}
		mu.Lock()
		arrived++
		if arrived == want {
			close(enough)
		}
		ch := enough
		mu.Unlock()
		if !endless {
			w.Header().Set("Content-Length", fmt.Sprint(len(smallImg)))
		}
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		// Hold the bodies until want requests arrived (they run at once),
		// or give up waiting (fewer ran at once: the test fails below).
		select {
		case <-ch:
		case <-time.After(5 * time.Second):
			mu.Lock()
			waited = true
			mu.Unlock()
		}
		if !endless {
			w.Write(smallImg)
			return true
		}
		// Half of the limit, a pause (long enough for the sampler to see
		// every download in flight), then no end.
		chunk := bytes.Repeat([]byte{0xcf}, 64<<10)
		for i := 0; ; i++ {
			if _, err := w.Write(chunk); err != nil {
				return true
			}
			if i == maxImage/len(chunk)/2 {
				w.(http.Flusher).Flush()
				select {
				case <-r.Context().Done():
					return true
				case <-time.After(50 * time.Millisecond):
				}
			}
		}
	})
	opts := testOptions()
	opts.MaxImageSize = maxImage
	opts.DownloadBudget = budget
	root := t.TempDir()
	s := openStore(t, root, opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	// run pulls n images at once, waiting in the server for wait of them,
	// and returns their errors and the most image files and bytes tmp/
	// held at once.
	run := func(prefix string, n, wait int) (errs []error, files int, bytes int64, together bool) {
		mu.Lock()
		arrived, want, enough, waited = 0, wait, make(chan struct{}), false
		mu.Unlock()
		defer func() {
			mu.Lock()
			together = !waited
			mu.Unlock()
		}()
		stop, sampled := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(sampled)
			for {
				ents, _ := filepath.Glob(filepath.Join(root, "tmp", "image-*"))
				var sum int64
				for _, e := range ents {
					if fi, err := os.Stat(e); err == nil {
						sum += fi.Size()
					}
				}
				files, bytes = max(files, len(ents)), max(bytes, sum)
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond):
				}
			}
		}()
		errs = make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = s.EnsureImage(context.Background(), src, ImageRef{Name: fmt.Sprintf("%s-%d", prefix, i)})
			}()
		}
		wg.Wait()
		close(stop)
		<-sampled
		return errs, files, bytes, false
	}
	errs, files, held, together := run("endless", 6, 2)
	for i, err := range errs {
		if !errors.Is(err, ErrSizeMismatch) {
			t.Fatalf("endless image %d: %v, want the size limit", i, err)
		}
	}
	t.Logf("endless: at most %d files and %d KiB in tmp/ at once, budget %d KiB", files, held>>10, budget>>10)
	if files > 2 || held > budget || !together {
		t.Errorf("endless images: %d files of %d bytes in tmp/ at once (2 at once: %v), want 2 within the budget of %d", files, held, together, budget)
	}
	errs, _, _, together = run("sized", 6, 6)
	for i, err := range errs {
		if err != nil {
			t.Fatalf("image %d with a length: %v", i, err)
		}
	}
	if !together {
		t.Errorf("the 6 image downloads with a length did not run at once (their room must shrink to their length)")
	}
	if !s.HasImage(small) {
		t.Error("image not stored")
	}
	if s.Budgets().DownloadBytesReserved != 0 {
		t.Errorf("%d bytes still reserved", s.Budgets().DownloadBytesReserved)
	}
	checkInvariant(t, root)
}

// While the download budget is spent, object downloads wait (no request
// is sent) and complete once it is given back; so do image parses while
// the parse budget is spent.
func TestBudgetsQueue(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 51, 5, 20000)
	d := writeRepoImage(t, repo, "img.cfs", files)
	writeRepoImage(t, repo, "other.cfs", makeFiles("o", 52, 3, 2000))
	ts := newTestServer(t, repo)
	opts := testOptions()
	opts.DownloadBudget, opts.ParseMemory = 1<<20, 1<<20
	s := openStore(t, t.TempDir(), opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "img.cfs"}); err != nil {
		t.Fatal(err)
	}

	all, err := s.tmpBudget.reserve(ctx, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := s.EnsureObjects(ctx, src, d); done <- err }()
	waitFor(t, "download waiting for the budget", func() bool { return s.Budgets().DownloadWaits > 0 })
	select {
	case err := <-done:
		t.Fatalf("EnsureObjects returned while the download budget was spent: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	if n := len(ts.objectHits()); n != 0 {
		t.Fatalf("%d objects requested while the download budget was spent", n)
	}
	all.release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	all, err = s.parseBudget.reserve(ctx, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	parsed := make(chan error, 1)
	go func() { _, err := s.EnsureImage(ctx, src, ImageRef{Name: "other.cfs"}); parsed <- err }()
	waitFor(t, "parse waiting for the budget", func() bool { return s.Budgets().ParseWaits > 0 })
	select {
	case err := <-parsed:
		t.Fatalf("EnsureImage returned while the parse budget was spent: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	all.release()
	if err := <-parsed; err != nil {
		t.Fatal(err)
	}
	// A caller that gives up while waiting gets its context's error.
	all, _ = s.tmpBudget.reserve(ctx, 1<<20)
	defer all.release()
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := s.EnsureImage(cctx, src, ImageRef{Name: "third.cfs"}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("waiting for the budget past the deadline: %v", err)
	}
	checkInvariant(t, s.Root())
}

// parseShape builds an image of n files of one kind for TestParseEstimate.
func parseShape(t *testing.T, kind string, n int) []byte {
	root := &cfs.Node{Mode: cfs.ModeDir | 0o755, Nlink: 2}
	dirs := max(n/1000, 1)
	for i := range dirs {
		dir := &cfs.Node{Name: fmt.Sprintf("d%04d", i), Mode: cfs.ModeDir | 0o755, Nlink: 2}
		if err := root.AddChild(dir); err != nil {
			t.Fatal(err)
		}
		for j := range n / dirs {
			f := &cfs.Node{Name: fmt.Sprintf("f%05d", j), Mode: cfs.ModeRegular | 0o644, Nlink: 1, Mtime: cfs.Timespec{Sec: int64(j)}}
			switch kind {
			case "compact":
				f.Mtime, f.Name = cfs.Timespec{}, fmt.Sprintf("%x", j)
			case "hardlink":
				if j > 0 {
					f = &cfs.Node{Name: fmt.Sprintf("%x", j), LinkTo: dir.Children[0]}
					dir.Children[0].Nlink++
				}
			case "external":
				dg := cfs.Digest(sha256.Sum256([]byte(fmt.Sprint(i, j))))
				f.Size, f.Payload, f.Digest = 4096, dg.ObjectPath(), &dg
			case "symlink":
				f.Mode, f.Payload = cfs.ModeSymlink|0o777, strings.Repeat("t", 60)
			}
			if err := dir.AddChild(f); err != nil {
				t.Fatal(err)
			}
		}
	}
	var buf bytes.Buffer
	if _, err := cfs.WriteImage(&buf, root, cfs.DefaultWriteOptions()); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestParseEstimate: the parse memory estimate covers what the reader
// and the canonical check really take (peak live heap, sampled while it parses with a low GC
// target) for images of many empty files (with their own mtimes, or
// compact inodes), hard links to one file, files backed by objects, and
// symlinks. It fails when the reader grows past the estimate; the
// printed ratios show how conservative the estimate is.
func TestParseEstimate(t *testing.T) {
	if testing.Short() {
		t.Skip("parses images of 20,000 inodes")
	}
	const n = 20000
	for _, kind := range []string{"empty", "compact", "hardlink", "external", "symlink"} {
		img := parseShape(t, kind, n)
		est := parseEstimate(int64(len(img)))
		// What the reservation covers: the parse and the canonical check
		// (the writer's image of the parsed tree, compared as written).
		var tree int64
		peak := heaptest.PeakLive(func() {
			im, _, err := parseImage(bytes.NewReader(img), int64(len(img)), 0)
			if err != nil {
				t.Fatal(err)
			}
			tree = im.Stats().Memory
			if err := cfs.CheckCanonical(im, bytes.NewReader(img), int64(len(img))); err != nil {
				t.Fatal(err)
			}
		})
		fmt.Printf("parse estimate, %d %s files (%d KiB image): estimate %.1f MiB, peak live heap %.1f MiB (ratio %.2f)\n",
			n, kind, len(img)>>10, float64(est)/(1<<20), float64(peak)/(1<<20), float64(est)/float64(peak))
		if est < peak {
			t.Errorf("%s: the estimate %d is below the %d bytes the parse took", kind, est, peak)
		}
		// What a download reserves must hold the tree's estimate, or the
		// parse would refuse an image the budget has room for.
		if tree > est {
			t.Errorf("%s: the tree's estimate %d is above the %d bytes reserved for it", kind, tree, est)
		}
	}
}

// waitFor polls cond for up to 10s (a bound, not a timing assertion).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 10s", what)
		}
	}
}

// TestParseWithinBudget: a downloaded image whose tree needs more memory
// than the whole parse budget (hard links: many entries in few bytes) is
// refused with ErrResourceLimit as soon as its parse reaches the budget,
// rather than parsed alone past it; nothing of it is kept and the budget
// is whole again. With a budget the tree fits in, it is stored.
func TestParseWithinBudget(t *testing.T) {
	repo := t.TempDir()
	img := parseShape(t, "hardlink", 20000)
	if err := os.MkdirAll(filepath.Join(repo, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(repo, "images", "links.cfs"), img, 0o644); err != nil {
		t.Fatal(err)
	}
	parsed, err := cfs.Open(bytes.NewReader(img), int64(len(img)), cfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	need := parsed.Stats().Memory
	ts := newTestServer(t, repo)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()

	opts := testOptions()
	opts.ParseMemory = need / 2
	s := openStore(t, t.TempDir(), opts)
	_, err = s.EnsureImage(ctx, src, ImageRef{Name: "links.cfs"})
	if !errors.Is(err, ErrResourceLimit) || !errors.Is(err, cfs.ErrTooLarge) || errors.Is(err, ErrInvalidImage) {
		t.Fatalf("an image of %d bytes whose tree needs %d bytes, with a parse budget of %d: %v, want ErrResourceLimit (not ErrInvalidImage)", len(img), need, opts.ParseMemory, err)
	}
	if n := s.Budgets().ParseBytesReserved; n != 0 {
		t.Errorf("%d bytes of the parse budget still reserved", n)
	}
	d := cfs.VerityDigestOf(img)
	if s.HasImage(d) {
		t.Error("the refused image is in the store")
	}
	checkInvariant(t, s.Root())

	opts.ParseMemory = need
	s = openStore(t, t.TempDir(), opts)
	if got, err := s.EnsureImage(ctx, src, ImageRef{Name: "links.cfs"}); err != nil || got != d {
		t.Fatalf("with a parse budget of the tree's estimate: %v, %v", got, err)
	}
}
