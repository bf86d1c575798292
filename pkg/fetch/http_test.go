package fetch

import (
	"context"
	"encoding/pem"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestHTTPSWithCABundleAndHTTP2: a server with a private CA is trusted only
// through --ca-file, is spoken to over HTTP/2, and an untrusted certificate
// fails at once (no retries).
func TestHTTPSWithCABundleAndHTTP2(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 81, 3, 20000)
	d := writeRepoImage(t, repo, "img.cfs", files)
	var h2, requests atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		if r.ProtoMajor == 2 {
			h2.Add(1)
		}
		if r.Header.Get("Authorization") != "Bearer s3cret" {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		http.ServeFile(w, r, filepath.Join(repo, filepath.FromSlash(r.URL.Path)))
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(ca, pemBytes, 0o644); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	s := openStore(t, t.TempDir(), testOptions())
	untrusted := newSource(t, srv.URL, HTTPOptions{BearerToken: "s3cret"})
	if _, err := s.EnsureImage(ctx, untrusted, ImageRef{Name: "img.cfs"}); err == nil || IsTransient(err) {
		t.Fatalf("untrusted certificate: got %v", err)
	}
	if requests.Load() != 0 {
		t.Errorf("a request got through an untrusted handshake")
	}
	if s.Counters().Retries != 0 {
		t.Errorf("an untrusted certificate was retried")
	}

	src := newSource(t, srv.URL, HTTPOptions{CAFile: ca, BearerToken: "s3cret"})
	got, err := s.EnsureImage(ctx, src, ImageRef{Name: "img.cfs", Digest: d})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.EnsureObjects(ctx, src, got); err != nil {
		t.Fatal(err)
	}
	if h2.Load() != requests.Load() || h2.Load() == 0 {
		t.Errorf("%d of %d requests over HTTP/2", h2.Load(), requests.Load())
	}
	noToken := newSource(t, srv.URL, HTTPOptions{CAFile: ca})
	_, err = s.EnsureImage(ctx, noToken, ImageRef{Name: "img.cfs"})
	if !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("without the token: %v", err)
	}
}

func TestHTTPSourceURLs(t *testing.T) {
	src, err := NewHTTPSource("http://user:pw@example.invalid/base/", HTTPOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if src.String() != "http://example.invalid/base" || src.opts.Username != "user" || src.opts.Password != "pw" {
		t.Errorf("credentials not moved out of the URL: %s %+v", src, src.opts)
	}
	var d [32]byte
	d[0] = 0xab
	if got := src.ObjectLocation(d); !strings.HasSuffix(got, "/base/objects/ab/"+strings.Repeat("0", 62)) {
		t.Errorf("object URL %s", got)
	}
	for _, bad := range []string{"", ".", "..", "a/b", "a b", "x%2f"} {
		if ValidImageName(bad) == nil {
			t.Errorf("image name %q accepted", bad)
		}
	}
	if _, err := NewHTTPSource("ftp://x/", HTTPOptions{}); err == nil {
		t.Error("ftp accepted")
	}
}

// TestHTTP2OneConnection: a pull keeps its downloads in flight within the
// HTTP/2 server's stream limit, so that one connection (and one
// connection's buffers) serves it; past the limit the transport would
// open another connection with buffers as large again.
func TestHTTP2OneConnection(t *testing.T) {
	const streams = 24
	repo := t.TempDir()
	files := makeFiles("f", 82, 480, 2000)
	writeRepoImage(t, repo, "img.cfs", files)
	var conns, inFlight, peak atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/objects/") {
			n := inFlight.Add(1)
			defer inFlight.Add(-1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
			time.Sleep(15 * time.Millisecond) // a round trip: the limit grows while the link shows no queue
		}
		http.ServeFile(w, r, filepath.Join(repo, filepath.FromSlash(r.URL.Path)))
	}))
	srv.EnableHTTP2 = true
	srv.Config.HTTP2 = &http.HTTP2Config{MaxConcurrentStreams: streams}
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			conns.Add(1)
		}
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	opts := testOptions()
	opts.Parallelism = 256
	s := openStore(t, t.TempDir(), opts)
	src := newSource(t, srv.URL, HTTPOptions{CAFile: ca})
	mustPull(t, s, src, "img.cfs")
	if got := src.MaxInFlight(); got != streams {
		t.Errorf("MaxInFlight = %d, the server advertises %d streams", got, streams)
	}
	if conns.Load() != 1 || peak.Load() > streams {
		t.Errorf("%d connections, at most %d requests at once; want 1 connection within the server's %d streams", conns.Load(), peak.Load(), streams)
	}
}

// Over HTTP/1.1 a source serves as many requests at once as it opens
// connections.
func TestHTTP1MaxInFlight(t *testing.T) {
	repo := t.TempDir()
	writeRepoImage(t, repo, "img.cfs", makeFiles("f", 83, 3, 100))
	ts := newTestServer(t, repo)
	src := newSource(t, ts.URL, HTTPOptions{MaxConnsPerHost: 12})
	if got := src.MaxInFlight(); got != 0 {
		t.Errorf("MaxInFlight = %d before any response, want 0 (unknown)", got)
	}
	s := openStore(t, t.TempDir(), testOptions())
	mustPull(t, s, src, "img.cfs")
	if got := src.MaxInFlight(); got != 12 {
		t.Errorf("MaxInFlight = %d over HTTP/1.1, want the 12 connections", got)
	}
}

// CloseIdleConnections closes the HTTP/2 connections too.
func TestHTTP2CloseIdleConnections(t *testing.T) {
	repo := t.TempDir()
	writeRepoImage(t, repo, "img.cfs", makeFiles("f", 84, 3, 100))
	closed := make(chan struct{}, 1)
	srv := httptest.NewUnstartedServer(http.FileServer(http.Dir(repo)))
	srv.EnableHTTP2 = true
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateClosed {
			closed <- struct{}{}
		}
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	src := newSource(t, srv.URL, HTTPOptions{CAFile: ca})
	mustPull(t, openStore(t, t.TempDir(), testOptions()), src, "img.cfs")
	src.CloseIdleConnections()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("the idle HTTP/2 connection is still open")
	}
}
