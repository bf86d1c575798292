package fetch

import (
	"crypto/tls"
	"encoding/pem"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// protoServer is a TLS test server of dir that records the protocol of
// every request and counts the connections accepted.
type protoServer struct {
	*httptest.Server
	ca    string
	conns atomic.Int32
	mu    sync.Mutex
	proto map[string][]int      // path prefix (/packs/*.tar, /objects/, other) → ProtoMajor of each request
	hook  func(r *http.Request) // called before each request is served
}

// How a protoServer treats HTTP/1.1.
const (
	speaksHTTP1 = iota
	refusesALPN // fails the handshake of a client that offers no h2
	answers505  // answers HTTP/1.1 requests 505 HTTP Version Not Supported
)

// newProtoServer serves dir over TLS with HTTP/2, and with HTTP/1.1 as
// http1 says, with the given HTTP/2 stream limit.
func newProtoServer(t *testing.T, dir string, http1 int, streams int) *protoServer {
	t.Helper()
	ps := &protoServer{proto: map[string][]int{}}
	ps.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		kind := "other"
		switch {
		case strings.HasSuffix(r.URL.Path, ".tar"):
			kind = "pack"
		case strings.HasPrefix(r.URL.Path, "/objects/"):
			kind = "object"
		}
		ps.mu.Lock()
		ps.proto[kind] = append(ps.proto[kind], r.ProtoMajor)
		hook := ps.hook
		ps.mu.Unlock()
		if hook != nil {
			hook(r)
		}
		if http1 == answers505 && r.ProtoMajor == 1 {
			http.Error(w, "HTTP/2 only", http.StatusHTTPVersionNotSupported)
			return
		}
		http.ServeFile(w, r, filepath.Join(dir, filepath.FromSlash(r.URL.Path)))
	}))
	ps.EnableHTTP2 = true
	ps.Config.HTTP2 = &http.HTTP2Config{MaxConcurrentStreams: streams}
	ps.TLS = &tls.Config{NextProtos: []string{"h2", "http/1.1"}}
	if http1 == refusesALPN {
		ps.TLS.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			if !slices.Contains(hello.SupportedProtos, "h2") {
				return nil, errors.New("HTTP/2 only")
			}
			return nil, nil
		}
	}
	ps.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			ps.conns.Add(1)
		}
	}
	ps.StartTLS()
	t.Cleanup(ps.Close)
	ps.ca = filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ps.ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ps.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	return ps
}

// protos is how many requests of kind came over HTTP/1.1 and over HTTP/2.
func (ps *protoServer) protos(kind string) (h1, h2 int) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for _, p := range ps.proto[kind] {
		if p == 1 {
			h1++
		} else {
			h2++
		}
	}
	return h1, h2
}

// TestPackRunsOwnConnections: over https, the pack runs and the objects
// of 1 MiB or more go each over a connection of their own with HTTP/1.1
// when the server speaks it, while the image, the pack index and the
// smaller objects share the HTTP/2 connection, and the source still
// reports the HTTP/2 server's stream limit (the HTTP/1.1 responses do not
// make it an HTTP/1.1 source).
func TestPackRunsOwnConnections(t *testing.T) {
	const streams = 40
	files := makeFiles("s", 11, 300, 64<<10)
	for i := range 3 {
		files = append(files, testFile{name: "big" + string(rune('a'+i)), data: content(uint64(120+i), 1<<20+4096)})
	}
	for i := range 4 {
		files = append(files, testFile{name: "mid" + string(rune('a'+i)), data: content(uint64(130+i), 200<<10)})
	}
	repo := t.TempDir()
	publishPacked(t, repo, "app.cfs", files, WithPacks(PackOptions{PackSize: 2 << 20, MaxObject: 128 << 10}))
	ps := newProtoServer(t, repo, speaksHTTP1, streams)
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	src := newSource(t, ps.URL, HTTPOptions{CAFile: ps.ca})
	mustPull(t, s, src, "app.cfs")
	if !hasObjects(t, root, files) {
		t.Fatal("objects missing after the pull")
	}
	checkInvariant(t, root)
	p1, p2 := ps.protos("pack")
	o1, o2 := ps.protos("object")
	x1, x2 := ps.protos("other")
	t.Logf("pack runs %d/%d, objects %d/%d, image and index %d/%d (HTTP/1.1/HTTP/2); %d connections", p1, p2, o1, o2, x1, x2, ps.conns.Load())
	if p1 < 2 || p2 != 0 {
		t.Errorf("pack runs: %d over HTTP/1.1, %d over HTTP/2; want every run over HTTP/1.1 (several runs)", p1, p2)
	}
	if o1 != 3 || o2 != 4 {
		t.Errorf("objects: %d over HTTP/1.1, %d over HTTP/2; want the 3 of 1 MiB or more over HTTP/1.1, the 4 smaller over HTTP/2", o1, o2)
	}
	if x1 != 0 || x2 < 2 {
		t.Errorf("image and index: %d over HTTP/1.1, %d over HTTP/2; want all over HTTP/2", x1, x2)
	}
	if got := src.MaxInFlight(); got != streams {
		t.Errorf("MaxInFlight = %d, the HTTP/2 server advertises %d streams", got, streams)
	}
	if n := src.own.Load(); n != 0 {
		t.Errorf("%d requests on connections of their own still counted in flight after the pull", n)
	}
}

// TestOwnConnectionsBounded: at most MaxConnsPerHost requests are on
// connections of their own at once; past that, large objects share the
// HTTP/2 connection rather than wait for one.
func TestOwnConnectionsBounded(t *testing.T) {
	var files []testFile
	for i := range 8 {
		files = append(files, testFile{name: "big" + string(rune('a'+i)), data: content(uint64(140+i), 1<<20+i)})
	}
	repo := t.TempDir()
	writeRepoImage(t, repo, "app.cfs", files)
	var inFlight, peak, arrived atomic.Int32
	four := make(chan struct{})
	ps := newProtoServer(t, repo, speaksHTTP1, 100)
	ps.mu.Lock()
	ps.hook = func(r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/objects/") {
			return
		}
		if r.ProtoMajor == 1 {
			n := inFlight.Add(1)
			defer inFlight.Add(-1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
		}
		// Hold the first requests until four are in flight.
		switch n := arrived.Add(1); {
		case n == 4:
			close(four)
		case n < 4:
			select {
			case <-four:
			case <-time.After(5 * time.Second):
			}
		}
	}
	ps.mu.Unlock()
	opts := testOptions()
	opts.Parallelism = 8
	src := newSource(t, ps.URL, HTTPOptions{CAFile: ps.ca, MaxConnsPerHost: 2})
	root := t.TempDir()
	mustPull(t, openStore(t, root, opts), src, "app.cfs")
	if !hasObjects(t, root, files) {
		t.Fatal("objects missing after the pull")
	}
	o1, o2 := ps.protos("object")
	t.Logf("objects %d/%d over HTTP/1.1/HTTP/2, at most %d over HTTP/1.1 at once", o1, o2, peak.Load())
	if peak.Load() > 2 || o1 == 0 || o2 == 0 {
		t.Errorf("%d over HTTP/1.1 (at most %d at once), %d over HTTP/2; want at most 2 at once on connections of their own, the others over HTTP/2", o1, peak.Load(), o2)
	}
}

// TestPackRunsHTTP2OnlyServer: a server that refuses HTTP/1.1 over TLS
// (at the handshake, or with 505) serves the runs over its HTTP/2
// connection, and the refusal is remembered: a second pull asks over
// HTTP/1.1 no more.
func TestPackRunsHTTP2OnlyServer(t *testing.T) {
	files := makeFiles("s", 12, 300, 64<<10)
	repo := t.TempDir()
	publishPacked(t, repo, "app.cfs", files, WithPacks(PackOptions{PackSize: 2 << 20}))
	for _, tc := range []struct {
		name  string
		http1 int
	}{{"handshake refused", refusesALPN}, {"505", answers505}} {
		t.Run(tc.name, func(t *testing.T) {
			ps := newProtoServer(t, repo, tc.http1, 100)
			src := newSource(t, ps.URL, HTTPOptions{CAFile: ps.ca})
			root := t.TempDir()
			mustPull(t, openStore(t, root, testOptions()), src, "app.cfs")
			if !hasObjects(t, root, files) {
				t.Fatal("objects missing after the pull")
			}
			p1, p2 := ps.protos("pack")
			if p2 < 2 {
				t.Errorf("pack runs: %d over HTTP/2, want every run", p2)
			}
			root2 := t.TempDir()
			mustPull(t, openStore(t, root2, testOptions()), src, "app.cfs")
			if !hasObjects(t, root2, files) {
				t.Fatal("objects missing after the second pull")
			}
			q1, q2 := ps.protos("pack")
			if q1 != p1 || q2-p2 < 2 {
				t.Errorf("second pull: %d pack requests over HTTP/1.1, %d over HTTP/2; want none over HTTP/1.1 (the refusal is remembered)", q1-p1, q2-p2)
			}
		})
	}
}
