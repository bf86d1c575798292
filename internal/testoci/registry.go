// Package testoci gives tests a real OCI registry on loopback
// (go-containerregistry's in-memory registry, with optional basic auth and
// request counting) and container images built with go-containerregistry.
package testoci

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
)

// Registry is an in-memory registry counting what it serves.
type Registry struct {
	Srv  *httptest.Server
	Host string // 127.0.0.1:PORT

	// IgnoreRange serves blobs whole, as a server without Range support.
	IgnoreRange atomic.Bool
	// Tamper, when set, rewrites blob bodies.
	Tamper atomic.Pointer[func(path string, body []byte) []byte]
	// Intercept, when set, sees every request first and, by returning
	// true, answers it itself (a broken server, a query to check).
	Intercept atomic.Pointer[func(w http.ResponseWriter, req *http.Request) bool]

	user, pass string

	mu        sync.Mutex
	requests  int
	denied    int
	blobGets  int
	blobBytes int64
}

// Options configure NewRegistry.
type Options struct {
	// User and Password, when set, are required (basic auth) for every
	// request but the /v2/ ping.
	User, Password string
}

// NewRegistry starts a registry for the test.
func NewRegistry(t testing.TB, opts Options) *Registry {
	t.Helper()
	r := &Registry{user: opts.User, pass: opts.Password}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)), registry.WithReferrersSupport(true))
	r.Srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		r.requests++
		r.mu.Unlock()
		if f := r.Intercept.Load(); f != nil && (*f)(w, req) {
			return
		}
		if r.user != "" {
			u, p, ok := req.BasicAuth()
			if !ok || u != r.user || p != r.pass {
				r.mu.Lock()
				r.denied++
				r.mu.Unlock()
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
				return
			}
		}
		isBlob := req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/blobs/sha256:")
		if !isBlob {
			inner.ServeHTTP(w, req)
			return
		}
		if r.IgnoreRange.Load() {
			req.Header.Del("Range")
		}
		cw := &countingResponse{ResponseWriter: w}
		if f := r.Tamper.Load(); f != nil {
			rec := httptest.NewRecorder()
			inner.ServeHTTP(rec, req)
			body := (*f)(req.URL.Path, rec.Body.Bytes())
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			cw.WriteHeader(rec.Code)
			_, _ = cw.Write(body)
		} else {
			inner.ServeHTTP(cw, req)
		}
		r.mu.Lock()
		r.blobGets++
		r.blobBytes += cw.n
		r.mu.Unlock()
	}))
	t.Cleanup(r.Srv.Close)
	r.Host = strings.TrimPrefix(r.Srv.URL, "http://")
	return r
}

// Reset zeroes the counters.
func (r *Registry) Reset() {
	r.mu.Lock()
	r.requests, r.denied, r.blobGets, r.blobBytes = 0, 0, 0, 0
	r.mu.Unlock()
}

// Counts are what the registry served since the last Reset.
type Counts struct {
	Requests  int   // every request
	Denied    int   // refused for credentials
	BlobGets  int   // GETs of blobs
	BlobBytes int64 // body bytes of blob GETs
}

// Counts returns the counters.
func (r *Registry) Counts() Counts {
	r.mu.Lock()
	defer r.mu.Unlock()
	return Counts{r.requests, r.denied, r.blobGets, r.blobBytes}
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
