package oci

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// testRegistry is go-containerregistry's in-memory registry on loopback,
// counting what it serves.
type testRegistry struct {
	srv  *httptest.Server
	host string

	ignoreRange atomic.Bool // serve blobs whole, as a server without Range
	// tamper, when set, rewrites blob bodies (digest → body → new body).
	tamper atomic.Pointer[func(path string, body []byte) []byte]

	mu        sync.Mutex
	requests  int   // every request
	blobGets  int   // GETs of blobs
	blobBytes int64 // body bytes of blob GETs
	ranges    []string
}

func newTestRegistry(t *testing.T) *testRegistry {
	t.Helper()
	r := &testRegistry{}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		r.requests++
		r.mu.Unlock()
		isBlob := req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/blobs/sha256:")
		if isBlob && r.ignoreRange.Load() {
			req.Header.Del("Range")
		}
		if !isBlob {
			inner.ServeHTTP(w, req)
			return
		}
		cw := &countingResponse{ResponseWriter: w}
		if f := r.tamper.Load(); f != nil {
			rec := httptest.NewRecorder()
			inner.ServeHTTP(rec, req)
			body := (*f)(req.URL.Path, rec.Body.Bytes())
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			cw.WriteHeader(rec.Code)
			cw.Write(body)
		} else {
			inner.ServeHTTP(cw, req)
		}
		r.mu.Lock()
		r.blobGets++
		r.blobBytes += cw.n
		if rg := req.Header.Get("Range"); rg != "" {
			r.ranges = append(r.ranges, rg)
		}
		r.mu.Unlock()
	}))
	t.Cleanup(r.srv.Close)
	r.host = strings.TrimPrefix(r.srv.URL, "http://")
	return r
}

func (r *testRegistry) reset() {
	r.mu.Lock()
	r.requests, r.blobGets, r.blobBytes, r.ranges = 0, 0, 0, nil
	r.mu.Unlock()
}

func (r *testRegistry) counts() (requests, blobGets int, blobBytes int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.requests, r.blobGets, r.blobBytes
}

type countingResponse struct {
	http.ResponseWriter
	n int64
}

func (c *countingResponse) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	c.n += int64(n)
	return n, err
}

func (r *testRegistry) ref(t *testing.T, s string) Reference {
	t.Helper()
	ref, err := ParseReference("oci://" + r.host + "/" + s)
	if err != nil {
		t.Fatal(err)
	}
	return ref
}

func (r *testRegistry) client(t *testing.T, ref Reference) *Client {
	t.Helper()
	c, err := NewClient(ref, Options{Insecure: []string{r.host}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// writeTree writes files named f0000… of random sizes (seeded) under dir:
// shared[i] picks the content seed of file i.
func writeTree(t *testing.T, dir string, seeds []uint64, size func(i int) int) {
	t.Helper()
	for i, seed := range seeds {
		p := filepath.Join(dir, fmt.Sprintf("d%02d", i%7), fmt.Sprintf("f%04d", i))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, size(i))
		rng := rand.New(rand.NewPCG(seed, 7))
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func pushDir(t *testing.T, c *Client, dir string, opts PushOptions) PushResult {
	t.Helper()
	in, err := InputFromDir(context.Background(), dir, cfs.DirOptions{}, cfs.WriteOptions{MinVersion: 1, MaxVersion: 1})
	if err != nil {
		t.Fatal(err)
	}
	res, err := Push(context.Background(), c, in, opts)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func openStore(t *testing.T) *fetch.Store {
	t.Helper()
	s, err := fetch.Open(context.Background(), t.TempDir(), fetch.Options{Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// checkObjects compares every object of image with the files of dir.
func checkObjects(t *testing.T, s *fetch.Store, image cfs.Digest, dir string) {
	t.Helper()
	objs, err := s.Objects(context.Background(), image)
	if err != nil {
		t.Fatal(err)
	}
	want := make(map[cfs.Digest][]byte)
	_ = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && fi.Size() > cfs.DirInlineContentMax {
			b, _ := os.ReadFile(p)
			h := cfs.NewVerityHash()
			h.Write(b)
			want[h.Digest()] = b
		}
		return nil
	})
	if len(objs) != len(want) {
		t.Fatalf("image has %d objects, the tree %d", len(objs), len(want))
	}
	for _, o := range objs {
		got, err := os.ReadFile(filepath.Join(s.ObjectsDir(), o.Digest.ObjectPath()))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want[o.Digest]) {
			t.Fatalf("object %s differs from its file", o.Digest)
		}
	}
}
