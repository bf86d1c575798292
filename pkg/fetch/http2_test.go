package fetch

import (
	"context"
	"crypto/sha256"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// TestHTTP2ConnectionBuffer: downloads whose bodies are not read (the
// store busy elsewhere) make an HTTP/2 connection buffer at most its
// window, 16 MiB (HTTP2Config), whatever the number of streams: the server
// can send no more than that before someone reads. Go's transport alone
// would take 1 GiB per connection (all 24 MiB here).
func TestHTTP2ConnectionBuffer(t *testing.T) {
	const streams, size = 24, 1 << 20
	var written, h1 atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor != 2 {
			h1.Add(1)
		}
		w.Header().Set("Content-Length", strconv.Itoa(size))
		chunk := make([]byte, 32<<10)
		for sent := 0; sent < size; sent += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			written.Add(int64(len(chunk)))
		}
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	src := newSource(t, srv.URL, HTTPOptions{CAFile: ca})
	for i := range streams {
		d := cfs.Digest(sha256.Sum256([]byte{byte(i)}))
		body, err := src.OpenObject(context.Background(), d, size)
		if err != nil {
			t.Fatal(err)
		}
		defer body.Close()
	}
	// Wait until the server can send no more (nothing read meanwhile).
	last := int64(-1)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		time.Sleep(200 * time.Millisecond)
		n := written.Load()
		if n == last {
			break
		}
		last = n
	}
	if h1.Load() != 0 {
		t.Fatalf("%d requests over HTTP/1.1, want HTTP/2", h1.Load())
	}
	// The window, plus what the server's handlers hold unsent (a chunk
	// each).
	const bound = 16<<20 + streams*64<<10
	t.Logf("%d streams of %d MiB unread: the server sent %.1f MiB", streams, size>>20, float64(last)/(1<<20))
	if last > bound {
		t.Errorf("the server sent %.1f MiB that nobody read: more than the 16 MiB connection window", float64(last)/(1<<20))
	}
}
