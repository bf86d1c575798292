package fetch

import (
	"context"
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

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

func TestPullGoldenImage(t *testing.T) {
	// The golden basic.cfs references objects whose content is pat(n).
	repo := t.TempDir()
	img, err := os.ReadFile(filepath.Join("..", "..", "testdata", "composefs", "basic.cfs"))
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(repo, "images"), 0o755)
	os.WriteFile(filepath.Join(repo, "images", "basic.cfs"), img, 0o644)
	for _, n := range []int{4095, 4097, 5000, 4096, 1048576} {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i % 251)
		}
		p := filepath.Join(repo, "objects", cfs.VerityDigestOf(b).ObjectPath())
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, b, 0o644)
	}
	ts := newTestServer(t, repo)
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	want := cfs.VerityDigestOf(img)
	d, err := s.EnsureImage(ctx, src, ImageRef{Name: "basic.cfs", Digest: want})
	if err != nil {
		t.Fatal(err)
	}
	if d != want {
		t.Fatalf("digest %s, want %s", d, want)
	}
	st, err := s.EnsureObjects(ctx, src, d)
	if err != nil {
		t.Fatal(err)
	}
	if st.Objects != 5 || st.Fetched != 5 {
		t.Fatalf("stats %+v", st)
	}
	checkInvariant(t, root)
	// Second time: nothing fetched, the image is not even requested.
	before := ts.count("/images/basic.cfs")
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "basic.cfs", Digest: want}); err != nil {
		t.Fatal(err)
	}
	st, err = s.EnsureObjects(ctx, src, d)
	if err != nil {
		t.Fatal(err)
	}
	if st.Present != 5 || st.Fetched != 0 || ts.count("/images/basic.cfs") != before {
		t.Fatalf("second pull fetched: %+v", st)
	}
	c := s.Counters()
	if c.ObjectsFetched != 5 || c.ObjectsDeduplicated != 5 || c.ImagesFetched != 1 {
		t.Fatalf("counters %+v", c)
	}
}

func TestOnlyMissingObjectsAndExtraDirs(t *testing.T) {
	repo := t.TempDir()
	common := makeFiles("c", 1, 20, 20000)
	a := append(append([]testFile{}, common...), makeFiles("a", 2, 5, 20000)...)
	b := append(append([]testFile{}, common...), makeFiles("b", 3, 5, 20000)...)
	da := writeRepoImage(t, repo, "a.cfs", a)
	db := writeRepoImage(t, repo, "b.cfs", b)
	// An extra read-only directory holding b's own files.
	extra := t.TempDir()
	for _, f := range b[20:] {
		p := filepath.Join(extra, cfs.VerityDigestOf(f.data).ObjectPath())
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, f.data, 0o644)
	}
	ts := newTestServer(t, repo)
	root := t.TempDir()
	opts := testOptions()
	opts.ExtraObjectDirs = []string{extra}
	s := openStore(t, root, opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if got := mustPull(t, s, src, "a.cfs"); got != da {
		t.Fatalf("pulled %s, want %s", got, da)
	}
	got, err := s.EnsureImage(ctx, src, ImageRef{Name: "b.cfs"})
	if err != nil || got != db {
		t.Fatal(got, err)
	}
	st, err := s.EnsureObjects(ctx, src, db)
	if err != nil {
		t.Fatal(err)
	}
	if st.Fetched != 0 || st.Present != 20 || st.Extra != 5 {
		t.Fatalf("stats %+v", st)
	}
	for path, n := range ts.objectHits() {
		if n != 1 {
			t.Errorf("%s requested %d times", path, n)
		}
	}
	if len(ts.objectHits()) != 25 {
		t.Errorf("%d objects requested, want 25", len(ts.objectHits()))
	}
	checkInvariant(t, root)
}

func TestImageDigestMismatchKeepsNothing(t *testing.T) {
	repo := t.TempDir()
	writeRepoImage(t, repo, "a.cfs", makeFiles("a", 1, 3, 9000))
	ts := newTestServer(t, repo)
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	var wrong cfs.Digest
	wrong[0] = 1
	_, err := s.EnsureImage(context.Background(), src, ImageRef{Name: "a.cfs", Digest: wrong})
	if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("got %v, want a digest mismatch", err)
	}
	if ts.count("/images/a.cfs") != 1 {
		t.Errorf("a digest mismatch was retried")
	}
	ents, _ := os.ReadDir(filepath.Join(root, "images"))
	if len(ents) != 0 {
		t.Errorf("images/ holds %d files", len(ents))
	}
	checkInvariant(t, root)
}

func TestImageSizeLimitAndGarbage(t *testing.T) {
	repo := t.TempDir()
	writeRepoImage(t, repo, "a.cfs", makeFiles("a", 1, 3, 9000))
	os.WriteFile(filepath.Join(repo, "images", "junk.cfs"), content(7, 20000), 0o644)
	ts := newTestServer(t, repo)
	root := t.TempDir()
	opts := testOptions()
	opts.MaxImageSize = 4096
	s := openStore(t, root, opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	_, err := s.EnsureImage(context.Background(), src, ImageRef{Name: "a.cfs"})
	if !errors.Is(err, ErrSizeMismatch) {
		t.Fatalf("got %v, want a size error", err)
	}
	s.Close()
	s = openStore(t, root, testOptions())
	_, err = s.EnsureImage(context.Background(), src, ImageRef{Name: "junk.cfs"})
	if !errors.Is(err, ErrInvalidImage) {
		t.Fatalf("got %v, want an invalid image", err)
	}
	checkInvariant(t, root)
}

// TestFaultMatrix injects every failure of the issue; each either succeeds
// after a retry or fails with a clear error, and the store stays clean.
func TestFaultMatrix(t *testing.T) {
	files := makeFiles("f", 11, 6, 300000)
	victim := cfs.VerityDigestOf(files[2].data)
	victimPath := "/objects/" + victim.ObjectPath()

	cases := []struct {
		name    string
		fault   faultFunc
		auth    string // server requires
		creds   bool   // client sends the right ones
		timeout time.Duration
		wantErr error // nil = success
		check   func(t *testing.T, err error, ts *testServer)
	}{
		{name: "503 then success", fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n == 1 {
				http.Error(w, "busy", http.StatusServiceUnavailable)
				return true
			}
			return false
		}},
		{name: "reset mid-body then success", fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.URL.Path == victimPath && n == 1 {
				cutConn(w, files[2].data, len(files[2].data)/2, true)
				return true
			}
			return false
		}},
		{name: "truncated body then success", fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.URL.Path == victimPath && n <= 2 {
				cutConn(w, files[2].data, len(files[2].data)-100, false)
				return true
			}
			return false
		}},
		{name: "truncated body always", wantErr: ErrTransient, fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.URL.Path == victimPath {
				cutConn(w, files[2].data, 1000, false)
				return true
			}
			return false
		}, check: func(t *testing.T, err error, ts *testServer) {
			if ts.count(victimPath) != 4 { // 1 + 3 retries
				t.Errorf("requested %d times, want 4", ts.count(victimPath))
			}
		}},
		{name: "wrong bytes", wantErr: ErrDigestMismatch, fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.URL.Path == victimPath {
				b := append([]byte(nil), files[2].data...)
				b[len(b)/3] ^= 0xff
				w.Write(b)
				return true
			}
			return false
		}, check: func(t *testing.T, err error, ts *testServer) {
			if ts.count(victimPath) != 1 {
				t.Errorf("a digest mismatch was retried (%d requests)", ts.count(victimPath))
			}
		}},
		{name: "404 for one object", wantErr: ErrNotFound, fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.URL.Path == victimPath {
				http.NotFound(w, r)
				return true
			}
			return false
		}, check: func(t *testing.T, err error, ts *testServer) {
			if ts.count(victimPath) != 1 {
				t.Errorf("a 404 was retried (%d requests)", ts.count(victimPath))
			}
		}},
		{name: "slow server past the deadline", timeout: 300 * time.Millisecond, wantErr: context.DeadlineExceeded,
			fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
				if r.URL.Path == victimPath {
					w.Header().Set("Content-Length", fmt.Sprint(len(files[2].data)))
					w.Write(files[2].data[:10])
					w.(http.Flusher).Flush()
					<-r.Context().Done()
					return true
				}
				return false
			}},
		{name: "401 without credentials", auth: "u:p", wantErr: ErrUnauthorized},
		{name: "basic auth", auth: "u:p", creds: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			repo := t.TempDir()
			d := writeRepoImage(t, repo, "img.cfs", files)
			ts := newTestServer(t, repo)
			ts.fault, ts.auth = tc.fault, tc.auth
			root := t.TempDir()
			s := openStore(t, root, testOptions())
			hopts := HTTPOptions{}
			if tc.creds {
				hopts.Username, hopts.Password = "u", "p"
			}
			src := newSource(t, ts.URL, hopts)
			_, err := s.EnsureImage(context.Background(), src, ImageRef{Name: "img.cfs", Digest: d})
			if err == nil {
				// The deadline covers the objects only: on a loaded machine
				// the image alone may take longer than a short deadline.
				ctx := context.Background()
				if tc.timeout > 0 {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, tc.timeout)
					defer cancel()
				}
				_, err = s.EnsureObjects(ctx, src, d)
			}
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("failed: %v", err)
			case tc.wantErr != nil && !errors.Is(err, tc.wantErr):
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			case tc.wantErr == nil:
				if !hasObjects(t, root, files) {
					t.Error("objects missing after success")
				}
			default:
				t.Logf("error: %v", err)
				if tc.wantErr != ErrUnauthorized && (!strings.Contains(err.Error(), ts.URL+victimPath) ||
					!strings.Contains(err.Error(), victim.String())) {
					t.Errorf("error does not name the URL and the object: %v", err)
				}
			}
			if tc.check != nil {
				tc.check(t, err, ts)
			}
			checkInvariant(t, root)
		})
	}
}

// TestDiskFull runs the store on a 2 MiB tmpfs without the free-space
// check (which would refuse before downloading, see
// TestFreeSpaceRefusedBeforeDownload): writing fails with ENOSPC, not
// retried, and leaves only whole verified objects and an empty tmp/.
func TestDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	root := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", root).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(root, 0); err != nil {
			t.Errorf("unmounting %s: %v", root, err)
		}
	})
	repo := t.TempDir()
	files := makeFiles("f", 5, 12, 600000) // several MiB
	d := writeRepoImage(t, repo, "big.cfs", files)
	ts := newTestServer(t, repo)
	opts := testOptions()
	opts.MinFreeSpace = -1
	s := openStore(t, root, opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "big.cfs", Digest: d}); err != nil {
		t.Fatal(err)
	}
	_, err := s.EnsureObjects(ctx, src, d)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("got %v, want ENOSPC", err)
	}
	t.Logf("error: %v", err)
	if s.Counters().Retries != 0 {
		t.Errorf("disk full was retried")
	}
	checkInvariant(t, root)
	s.Close()
}

// TestConcurrentEnsureObjects: 50 concurrent pulls of 10 images sharing
// most files request every object from the server exactly once.
func TestConcurrentEnsureObjects(t *testing.T) {
	repo := t.TempDir()
	common := makeFiles("c", 21, 60, 40000)
	var imgs []cfs.Digest
	for i := range 10 {
		files := append(append([]testFile{}, common...), makeFiles(fmt.Sprintf("u%d-", i), uint64(100+i), 6, 40000)...)
		imgs = append(imgs, writeRepoImage(t, repo, fmt.Sprintf("img%d.cfs", i), files))
	}
	ts := newTestServer(t, repo)
	root := t.TempDir()
	opts := testOptions()
	opts.Parallelism = 4
	s := openStore(t, root, opts)
	src := newSource(t, ts.URL, HTTPOptions{})
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			d, err := s.EnsureImage(ctx, src, ImageRef{Name: fmt.Sprintf("img%d.cfs", i%10)})
			if err == nil && d != imgs[i%10] {
				err = fmt.Errorf("image %d has digest %s", i%10, d)
			}
			if err == nil {
				_, err = s.EnsureObjects(ctx, src, d)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	hits := ts.objectHits()
	if len(hits) != 60+60 {
		t.Errorf("%d distinct objects requested, want 120", len(hits))
	}
	for p, n := range hits {
		if n != 1 {
			t.Errorf("%s requested %d times", p, n)
		}
	}
	c := s.Counters()
	if c.ObjectsFetched != 120 {
		t.Errorf("fetched %d objects, want 120", c.ObjectsFetched)
	}
	checkInvariant(t, root)
}

// TestSharedDownloadSurvivesOneCancel: a caller giving up does not fail the
// download another caller waits for.
func TestSharedDownloadSurvivesOneCancel(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 31, 1, 100000)
	d := writeRepoImage(t, repo, "img.cfs", files)
	ts := newTestServer(t, repo)
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	ts.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if strings.HasPrefix(r.URL.Path, "/objects/") {
			started <- struct{}{}
			<-release
		}
		return false
	}
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	if _, err := s.EnsureImage(context.Background(), src, ImageRef{Name: "img.cfs"}); err != nil {
		t.Fatal(err)
	}
	ctx1, cancel1 := context.WithCancel(context.Background())
	err1 := make(chan error, 1)
	go func() { _, err := s.EnsureObjects(ctx1, src, d); err1 <- err }()
	<-started
	err2 := make(chan error, 1)
	go func() { _, err := s.EnsureObjects(context.Background(), src, d); err2 <- err }()
	// Wait until the second caller has joined the flight.
	for {
		s.objects.mu.Lock()
		var w int
		for _, f := range s.objects.m {
			w = f.waiters
		}
		s.objects.mu.Unlock()
		if w == 2 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	cancel1()
	if err := <-err1; !errors.Is(err, context.Canceled) {
		t.Fatalf("first caller: %v", err)
	}
	close(release)
	if err := <-err2; err != nil {
		t.Fatalf("second caller: %v", err)
	}
	if ts.count("/objects/"+cfs.VerityDigestOf(files[0].data).ObjectPath()) != 1 {
		t.Error("the object was downloaded twice")
	}
	checkInvariant(t, root)
}
