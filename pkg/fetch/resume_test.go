package fetch

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// countingWriter counts the body bytes a handler writes.
type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (w countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.n.Add(int64(n))
	return n, err
}

func (w countingWriter) Flush() { w.ResponseWriter.(http.Flusher).Flush() }

// cutObjectServer serves repo; the first request of the object with data
// gets headers for all of it, cut bytes, and a dropped connection. Later
// requests of it are served by serve (nil: http.ServeContent, ranges
// included). sent counts the object's body bytes sent, ranges what later
// requests asked for.
type cutObjectServer struct {
	*testServer
	sent   atomic.Int64
	mu     sync.Mutex
	ranges []string
}

func newCutObjectServer(t *testing.T, repo string, data []byte, cut int, serve func(w http.ResponseWriter, r *http.Request)) *cutObjectServer {
	cs := &cutObjectServer{testServer: newTestServer(t, repo)}
	obj := "/objects/" + cfs.VerityDigestOf(data).ObjectPath()
	cs.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if r.URL.Path != obj {
			return false
		}
		cw := countingWriter{w, &cs.sent}
		if n == 1 {
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			w.WriteHeader(http.StatusOK)
			cw.Write(data[:cut])
			cw.Flush()
			panic(http.ErrAbortHandler) // the connection drops
		}
		cs.mu.Lock()
		cs.ranges = append(cs.ranges, r.Header.Get("Range"))
		cs.mu.Unlock()
		if serve != nil {
			serve(cw, r)
		} else {
			http.ServeContent(cw, r, "", time.Time{}, bytes.NewReader(data))
		}
		return true
	})
	return cs
}

// A 200 MiB object cut at 90 % is resumed from the first byte missing:
// nothing is sent twice, and the object stored is whole and verified.
func TestResumeCutDownload(t *testing.T) {
	const size = 200 << 20
	data := bytes.Repeat(content(77, 1<<20), size>>20)
	for i := 0; i < size; i += 1 << 20 { // no two MiB alike
		copy(data[i:], fmt.Sprintf("MiB %d", i>>20))
	}
	repo := t.TempDir()
	img := writeRepoImage(t, repo, "big.cfs", []testFile{{"big", data}})
	cut := size / 10 * 9
	ts := newCutObjectServer(t, repo, data, cut, nil)
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "big.cfs"}); err != nil {
		t.Fatal(err)
	}
	st, err := s.EnsureObjects(ctx, src, img)
	if err != nil {
		t.Fatal(err)
	}
	resent := ts.sent.Load() - size
	t.Logf("sent %d bytes for a %d-byte object cut at %d: %d re-sent; requests after the cut %q", ts.sent.Load(), size, cut, resent, ts.ranges)
	if resent != 0 {
		t.Fatalf("%d bytes sent twice (the download started over?)", resent)
	}
	if len(ts.ranges) != 1 || ts.ranges[0] != fmt.Sprintf("bytes=%d-%d", cut, size-1) {
		t.Fatalf("requests after the cut asked for %q", ts.ranges)
	}
	if c := s.Counters(); c.Resumes != 1 || c.ResumedBytes != uint64(cut) || c.Retries != 1 {
		t.Fatalf("counters %+v", c)
	}
	if st.Fetched != 1 || st.FetchedBytes != size {
		t.Fatalf("stats %+v", st)
	}
	checkDigestFile(t, s.objectPath(cfs.VerityDigestOf(data)), cfs.VerityDigestOf(data))
	checkInvariant(t, root)
}

// Where the resumed bytes do not give the digest (a server whose range
// answers are wrong), the download starts over once, whole; where the
// server ignores Range, the whole object it sends is taken.
func TestResumeFallsBack(t *testing.T) {
	data := content(78, 1<<20)
	cut := len(data) / 2
	for _, c := range []struct {
		name   string
		serve  func(w http.ResponseWriter, r *http.Request)
		ranges int // requests after the cut
		sent   int64
	}{
		{"range ignored", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			w.Write(data)
		}, 1, int64(cut + len(data))},
		{"wrong range content", func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Range") != "" {
				bad := bytes.Clone(data)
				bad[len(bad)-1] ^= 1
				http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(bad))
				return
			}
			http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
		}, 2, int64(len(data) + len(data))},
	} {
		t.Run(c.name, func(t *testing.T) {
			repo := t.TempDir()
			img := writeRepoImage(t, repo, "a.cfs", []testFile{{"a", data}})
			ts := newCutObjectServer(t, repo, data, cut, c.serve)
			root := t.TempDir()
			s := openStore(t, root, testOptions())
			src := newSource(t, ts.URL, HTTPOptions{})
			ctx := context.Background()
			if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "a.cfs"}); err != nil {
				t.Fatal(err)
			}
			if _, err := s.EnsureObjects(ctx, src, img); err != nil {
				t.Fatal(err)
			}
			if len(ts.ranges) != c.ranges || ts.sent.Load() != c.sent {
				t.Fatalf("%d requests after the cut (%q), %d bytes sent; want %d, %d", len(ts.ranges), ts.ranges, ts.sent.Load(), c.ranges, c.sent)
			}
			checkDigestFile(t, s.objectPath(cfs.VerityDigestOf(data)), cfs.VerityDigestOf(data))
			checkInvariant(t, root)
		})
	}
}
