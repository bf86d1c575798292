package fetch

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// testFile is one regular file of a test image.
type testFile struct {
	name string
	data []byte
}

// content returns deterministic bytes for seed.
func content(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// writeRepoImage writes the image of files (plus their objects) into the
// repository dir under images/name and returns the image digest.
func writeRepoImage(t testing.TB, repo, name string, files []testFile) cfs.Digest {
	t.Helper()
	var dump strings.Builder
	dump.WriteString("/ 0 40755 2 0 0 0 1700000000.0 - - -\n")
	for _, f := range files {
		d := cfs.VerityDigestOf(f.data)
		fmt.Fprintf(&dump, "/%s %d 100644 1 0 0 0 1700000000.0 %s - %s\n", f.name, len(f.data), d.ObjectPath(), d)
		p := filepath.Join(repo, "objects", d.ObjectPath())
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, f.data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	root, err := cfs.ParseDump(strings.NewReader(dump.String()), cfs.DumpOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(repo, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	d, err := cfs.WriteImageFile(filepath.Join(repo, "images", name), root, cfs.DefaultWriteOptions())
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// makeFiles returns n files of sizes between 65 bytes and maxSize, seeded.
func makeFiles(prefix string, seed uint64, n, maxSize int) []testFile {
	r := rand.New(rand.NewPCG(seed, 1))
	out := make([]testFile, n)
	for i := range out {
		size := 65 + r.IntN(maxSize-64)
		out[i] = testFile{name: fmt.Sprintf("%s%04d", prefix, i), data: content(seed*1000003+uint64(i), size)}
	}
	return out
}

// faultFunc may handle a request itself (returning true); n is how many
// times this path was requested before, counting this one from 1.
type faultFunc func(w http.ResponseWriter, r *http.Request, n int) bool

// testServer serves a repository directory and counts requests per path.
type testServer struct {
	*httptest.Server
	dir string

	mu    sync.Mutex
	hits  map[string]int
	fault faultFunc
	auth  string // required "user:pass", or ""
}

func newTestServer(t testing.TB, dir string) *testServer {
	ts := &testServer{dir: dir, hits: make(map[string]int)}
	ts.Server = httptest.NewServer(http.HandlerFunc(ts.serve))
	t.Cleanup(ts.Close)
	return ts
}

func (ts *testServer) setFault(f faultFunc) {
	ts.mu.Lock()
	ts.fault = f
	ts.mu.Unlock()
}

func (ts *testServer) count(path string) int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.hits[path]
}

func (ts *testServer) objectHits() map[string]int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	m := make(map[string]int)
	for k, v := range ts.hits {
		if strings.HasPrefix(k, "/objects/") {
			m[k] = v
		}
	}
	return m
}

func (ts *testServer) serve(w http.ResponseWriter, r *http.Request) {
	ts.mu.Lock()
	ts.hits[r.URL.Path]++
	n := ts.hits[r.URL.Path]
	fault, auth := ts.fault, ts.auth
	ts.mu.Unlock()
	if auth != "" {
		u, p, ok := r.BasicAuth()
		if !ok || u+":"+p != auth {
			w.Header().Set("WWW-Authenticate", `Basic realm="repo"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
	}
	if fault != nil && fault(w, r, n) {
		return
	}
	http.ServeFile(w, r, filepath.Join(ts.dir, filepath.FromSlash(r.URL.Path)))
}

// cutConn writes the headers for the full body, then part of it, then
// drops the connection: with reset, by a TCP RST.
func cutConn(w http.ResponseWriter, full []byte, part int, reset bool) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic("no hijacker")
	}
	conn, buf, err := hj.Hijack()
	if err != nil {
		panic(err)
	}
	fmt.Fprintf(buf, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n", len(full))
	buf.Write(full[:part])
	buf.Flush()
	if reset {
		if tc, ok := conn.(interface{ SetLinger(int) error }); ok {
			tc.SetLinger(0)
		}
	}
	conn.Close()
}

func testOptions() Options {
	return Options{
		Parallelism:    8,
		Retries:        3,
		RetryBaseDelay: time.Millisecond,
		RetryMaxDelay:  5 * time.Millisecond,
	}
}

func openStore(t testing.TB, dir string, opts Options) *Store {
	t.Helper()
	s, err := Open(context.Background(), dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func newSource(t testing.TB, url string, opts HTTPOptions) *HTTPSource {
	t.Helper()
	src, err := NewHTTPSource(url, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(src.CloseIdleConnections)
	return src
}

// checkInvariant checks that every file under objects/ and images/ has the
// digest its name says, nothing else is there, and tmp/ is empty.
func checkInvariant(t testing.TB, root string) {
	t.Helper()
	err := filepath.WalkDir(filepath.Join(root, "objects"), func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(filepath.Join(root, "objects"), path)
		if e.IsDir() {
			if rel != "." && len(rel) != 2 {
				t.Errorf("unexpected directory objects/%s", rel)
			}
			return nil
		}
		want, err := cfs.ParseObjectPath(filepath.ToSlash(rel))
		if err != nil {
			t.Errorf("objects/%s: %v", rel, err)
			return nil
		}
		checkDigestFile(t, path, want)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(filepath.Join(root, "images"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		want, err := cfs.ParseDigest(strings.TrimSuffix(e.Name(), ".cfs"))
		if err != nil || !strings.HasSuffix(e.Name(), ".cfs") {
			t.Errorf("images/%s: not named by a digest", e.Name())
			continue
		}
		checkDigestFile(t, filepath.Join(root, "images", e.Name()), want)
	}
	err = filepath.WalkDir(filepath.Join(root, "tmp"), func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !e.IsDir() {
			t.Errorf("tmp/ not empty: %s", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func checkDigestFile(t testing.TB, path string, want cfs.Digest) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Error(err)
		return
	}
	if got := cfs.VerityDigestOf(b); got != want {
		t.Errorf("%s has digest %s", path, got)
	}
}

// hasObjects reports whether every file of files is in the store.
func hasObjects(t testing.TB, root string, files []testFile) bool {
	t.Helper()
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(root, "objects", cfs.VerityDigestOf(f.data).ObjectPath()))
		if err != nil || !bytes.Equal(b, f.data) {
			return false
		}
	}
	return true
}

// mustPull ensures image name and all its objects in s, failing the test
// on any error, and returns the image digest.
func mustPull(t testing.TB, s *Store, src Source, name string) cfs.Digest {
	t.Helper()
	ctx := context.Background()
	d, err := s.EnsureImage(ctx, src, ImageRef{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.EnsureObjects(ctx, src, d); err != nil {
		t.Fatal(err)
	}
	return d
}

// pullWhileHeld fetches the objects of image first, holding its requests
// of the paths hold matches from the first such request on, while the
// objects of image second are fetched in full; then lets the first go on
// and returns its stats.
func pullWhileHeld(t *testing.T, ts *testServer, s *Store, src Source, first, second cfs.Digest, hold func(path string) bool) Stats {
	t.Helper()
	ctx := context.Background()
	held := make(chan struct{})
	started := make(chan struct{})
	var once sync.Once
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if hold(r.URL.Path) {
			once.Do(func() { close(started) })
			<-held
		}
		return false
	})
	defer ts.setFault(nil)
	res := make(chan error, 1)
	var st Stats
	go func() {
		var err error
		st, err = s.EnsureObjects(ctx, src, first)
		res <- err
	}()
	<-started
	if _, err := s.EnsureObjects(ctx, src, second); err != nil {
		close(held)
		t.Fatal(err)
	}
	close(held)
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	return st
}

// lonePullLookups pulls image name (digest d) from src into a new store,
// alone, and returns how many object lookups its objects took.
func lonePullLookups(t *testing.T, src Source, name string, d cfs.Digest) uint64 {
	t.Helper()
	ctx := context.Background()
	s := openStore(t, t.TempDir(), testOptions())
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: name}); err != nil {
		t.Fatal(err)
	}
	before := s.lookups.Load()
	if _, err := s.EnsureObjects(ctx, src, d); err != nil {
		t.Fatal(err)
	}
	return s.lookups.Load() - before
}
