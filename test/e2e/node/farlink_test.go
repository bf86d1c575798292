package node

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/internal/testrepo"
)

// farLink stands for one link between the node and its repository: every
// response waits a round trip, and all of them share the link's bandwidth
// through one queue (headers and each chunk are sent when the link has
// sent what was queued before them), whatever the connections.
type farLink struct {
	rtt  time.Duration
	rate float64 // bytes per second

	mu   sync.Mutex
	free time.Time // when the link has sent everything queued so far
}

// send waits until n more bytes have gone over the link.
func (l *farLink) send(n int) {
	d := time.Duration(float64(n) / l.rate * float64(time.Second))
	l.mu.Lock()
	start := time.Now()
	if l.free.After(start) {
		start = l.free
	}
	l.free = start.Add(d)
	done := l.free
	l.mu.Unlock()
	time.Sleep(time.Until(done))
}

// serve answers GETs of the repository directory dir over the link.
func (l *farLink) serve(dir string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(l.rtt)
		name := filepath.Join(dir, filepath.FromSlash(strings.TrimPrefix(r.URL.Path, "/")))
		if !strings.HasPrefix(name, dir+"/") {
			http.NotFound(w, r)
			return
		}
		data, err := os.ReadFile(name)
		if err != nil {
			http.NotFound(w, r)
			return
		}
		// The headers queue behind what the link is sending.
		l.send(256)
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.(http.Flusher).Flush()
		for len(data) > 0 {
			n := min(len(data), 16<<10)
			l.send(n)
			if _, err := w.Write(data[:n]); err != nil {
				return
			}
			data = data[n:]
		}
	})
}

// farImageFiles are the files of image i: n files of random bytes (no
// object shared with another image), log-uniform from 1 KiB to 64 KiB.
func farImageFiles(i, n int) (map[string]string, int64) {
	rnd := rand.New(rand.NewPCG(uint64(i), 13))
	files := make(map[string]string, n)
	var total int64
	for j := range n {
		size := int(math.Exp(math.Log(1<<10) + rnd.Float64()*(math.Log(64<<10)-math.Log(1<<10))))
		b := make([]byte, size)
		_, _ = rand.NewChaCha8([32]byte{byte(i), byte(j), byte(j >> 8)}).Read(b)
		files[fmt.Sprintf("lib/f%03d", j)] = string(b)
		total += int64(size)
	}
	return files, total
}

// farVolumesRSS is the bound on the plugin's peak RSS while 50 volumes of
// distinct images are published at once over a far link (issue 13).
const farVolumesRSS = 256 << 20

// TestFarLinkVolumes publishes 50 volumes of distinct images at once, cold,
// from a repository behind a far link (200 Mbit/s shared, 80 ms round
// trip), and checks the plugin's peak RSS (VmHWM) stays under 256 MiB with
// its node-wide cap on downloads (--max-downloads, default 256), with no
// GOMEMLIMIT to help. The control lifts the cap: every volume then runs
// its own adaptive concurrency (up to --fetch-concurrency 256 each, and 64
// connections per volume), and the peak RSS must exceed the bound, or the
// test no longer measures anything.
func TestFarLinkVolumes(t *testing.T) {
	requirePluginRun(t)
	bin := buildBinary(t)
	const volumes, filesPer = 50, 160
	dir := t.TempDir()
	var total int64
	names := make([]string, volumes)
	for i := range volumes {
		files, n := farImageFiles(i, filesPer)
		names[i] = fmt.Sprintf("far-%02d", i)
		testrepo.Publish(t, dir, names[i], files)
		total += n
	}
	link := &farLink{rtt: 80 * time.Millisecond, rate: 200e6 / 8}
	srv := httptest.NewServer(link.serve(dir))
	t.Cleanup(srv.Close)
	vcs := make([]map[string]string, volumes)
	for i := range vcs {
		vcs[i] = map[string]string{"repository": srv.URL, "image": names[i]}
	}
	for _, capped := range []bool{true, false} {
		name := map[bool]string{true: "cap", false: "no cap"}[capped]
		t.Run(name, func(t *testing.T) {
			flags := []string{} // the default --max-downloads
			if !capped {
				flags = []string{"--max-downloads", "1000000"}
			}
			e := newBoundsEnv(t, bin, srv.URL, flags...)
			e.environ = nil // no GOMEMLIMIT: the cap alone bounds it
			p := e.start()
			start := time.Now()
			got := publishAll(t, p, vcs)
			took := time.Since(start)
			rss := peakRSS(t, p.cmd.Process.Pid)
			fmt.Printf("%d cold volumes (%.1f MiB of objects) over 200 Mbit/s, 80 ms RTT, %s: %.1f s (the link alone %.1f s), peak RSS %.1f MiB\n",
				volumes, mib(total), name, took.Seconds(), float64(total)/link.rate, mib(rss))
			checkPeak(t, "volume", got, rss, farVolumesRSS, capped, "without the node-wide cap")
		})
	}
}
