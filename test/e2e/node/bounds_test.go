package node

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// rssLimit is what the plugin must stay under whatever its volumes ask
// for: the chart's memory limit. One of this test's 48 MB images takes
// about 350 MiB of heap to parse and check canonical, so two at once
// would not fit.
const rssLimit = 512 << 20

// goMemLimit is the plugin's GOMEMLIMIT, about 90 % of rssLimit, as the
// README advises.
const goMemLimit = "460MiB"

// TestBoundedResources runs the plugin against hostile repositories, with
// its budgets and, as a control that shows each measure can fail, without
// them:
//   - twenty concurrent endless image downloads: the bytes in tmp/ stay
//     within --download-budget;
//   - five concurrent images of 330,000 inodes (26 MB each, each tree
//     and its canonical check estimated at 230 MB, within the default
//     --parse-memory but not two of them): parsing them one at a time
//     keeps the plugin's peak RSS under the chart's 512 MiB limit;
//   - an image claiming a 100 GiB object: refused with ResourceExhausted
//     before the object is requested, by --max-object-size and (with no
//     size limit) by the free space left.
//
// It prints the plugin's peak RSS (VmHWM) for each.
func TestBoundedResources(t *testing.T) {
	requirePluginRun(t)
	bin := buildBinary(t)
	t.Run("endless images", func(t *testing.T) { endlessImages(t, bin) })
	t.Run("many inodes", func(t *testing.T) { manyInodes(t, bin) })
	t.Run("huge object", func(t *testing.T) { hugeObject(t, bin) })
}

// newBoundsEnv is an env with a fresh store for one plugin run.
func newBoundsEnv(t *testing.T, bin, repoURL string, flags ...string) *env {
	e := &env{t: t, bin: bin, dir: t.TempDir(), allowed: repoURL + "/", flags: flags,
		environ: []string{"GOMEMLIMIT=" + goMemLimit}}
	e.store = filepath.Join(e.dir, "store")
	e.sock = filepath.Join(e.dir, "csi.sock")
	return e
}

// peakRSS is the process's VmHWM.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc/PID/status")
	return 0
}

// tmpBytes is what the plugin pid holds in tmp: named files there, and
// files it has open there (anonymous O_TMPFILE objects have no name).
func tmpBytes(pid int, tmp string) int64 {
	sizes := map[uint64]int64{}
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, _ := os.ReadDir(fdDir)
	for _, fd := range fds {
		p := filepath.Join(fdDir, fd.Name())
		if link, err := os.Readlink(p); err != nil || !strings.HasPrefix(link, tmp+"/") {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(p, &st) == nil && st.Mode&syscall.S_IFMT == syscall.S_IFREG {
			sizes[st.Ino] = st.Size
		}
	}
	_ = filepath.WalkDir(tmp, func(p string, d fs.DirEntry, err error) error {
		var st syscall.Stat_t
		if err == nil && d.Type().IsRegular() && syscall.Stat(p, &st) == nil {
			sizes[st.Ino] = st.Size
		}
		return nil
	})
	var sum int64
	for _, n := range sizes {
		sum += n
	}
	return sum
}

// sampleTmp samples tmpBytes every 2ms until stop is called, which
// returns the largest value seen.
func sampleTmp(pid int, tmp string) (stop func() int64) {
	var top atomic.Int64
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			top.Store(max(top.Load(), tmpBytes(pid, tmp)))
			select {
			case <-quit:
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	return func() int64 { close(quit); <-done; return top.Load() }
}

// publishAll publishes vcs at once (retrying Aborted, as kubelet does) and
// returns the codes they end with; targets are unmounted at the end.
func publishAll(t *testing.T, p *plugin, vcs []map[string]string) []codes.Code {
	pods := t.TempDir()
	out := make([]codes.Code, len(vcs))
	var wg sync.WaitGroup
	for i, vc := range vcs {
		target := filepath.Join(pods, fmt.Sprintf("pod-%02d", i), "vol")
		t.Cleanup(func() {
			for {
				if _, m, _ := cfs.IsMounted(target); !m || cfs.Unmount(target, true) != nil {
					break
				}
			}
		})
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			for {
				_, err := p.node.NodePublishVolume(ctx, publishReq(fmt.Sprintf("vol-%d", i), target, vc))
				if status.Code(err) == codes.Aborted && ctx.Err() == nil {
					continue
				}
				if err != nil {
					t.Logf("publish %d: %v", i, err)
				}
				out[i] = status.Code(err)
				return
			}
		}()
	}
	wg.Wait()
	return out
}

func endlessImages(t *testing.T, bin string) {
	const maxImage, budget = 8 << 20, 32 << 20
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/images/") {
			http.NotFound(w, r)
			return
		}
		// No length; three quarters of the limit, a pause (so that the
		// downloads overlap as much as the plugin lets them), then no end.
		chunk := make([]byte, 64<<10)
		for i := 0; ; i++ {
			if _, err := w.Write(chunk); err != nil {
				return
			}
			if i == maxImage/len(chunk)*3/4 {
				w.(http.Flusher).Flush()
				select {
				case <-r.Context().Done():
					return
				case <-time.After(300 * time.Millisecond):
				}
			}
		}
	}))
	t.Cleanup(srv.Close)
	vcs := make([]map[string]string, 20)
	for i := range vcs {
		vcs[i] = map[string]string{"repository": srv.URL, "image": fmt.Sprintf("endless-%d", i)}
	}
	for _, budgets := range []bool{true, false} {
		name := map[bool]string{true: "budgets", false: "no budget"}[budgets]
		t.Run(name, func(t *testing.T) {
			flags := []string{"--max-image-size", "8M", "--download-budget", "32M"}
			if !budgets {
				flags[3] = "0"
			}
			e := newBoundsEnv(t, bin, srv.URL, flags...)
			p := e.start()
			stop := sampleTmp(p.cmd.Process.Pid, filepath.Join(e.store, "tmp"))
			got := publishAll(t, p, vcs)
			held := stop()
			rss := peakRSS(t, p.cmd.Process.Pid)
			fmt.Printf("20 endless image downloads, %s: at most %.1f MiB in tmp/ (budget 32 MiB); peak RSS %.1f MiB\n", name, mib(held), mib(rss))
			for i, c := range got {
				if c != codes.FailedPrecondition {
					t.Errorf("endless image %d: %v, want FailedPrecondition (larger than --max-image-size)", i, c)
				}
			}
			if rss >= rssLimit {
				t.Errorf("peak RSS %.1f MiB, want under %d MiB", mib(rss), rssLimit>>20)
			}
			if budgets && held > budget {
				t.Errorf("%.1f MiB in tmp/ at once, more than the budget of 32 MiB", mib(held))
			}
			if !budgets && held <= budget {
				t.Errorf("control: without a budget only %.1f MiB were in tmp/ at once: this attack no longer measures anything", mib(held))
			}
		})
	}
}

// inodeImage writes an image of 330,000 empty files (about 26 MB) at path.
func inodeImage(t *testing.T, path string) {
	root := &cfs.Node{Mode: cfs.ModeDir | 0o755, Nlink: 2}
	for i := range 330 {
		dir := &cfs.Node{Name: fmt.Sprintf("d%03d", i), Mode: cfs.ModeDir | 0o755, Nlink: 2}
		if err := root.AddChild(dir); err != nil {
			t.Fatal(err)
		}
		for j := range 1000 {
			f := &cfs.Node{Name: fmt.Sprintf("f%04d", j), Mode: cfs.ModeRegular | 0o644, Nlink: 1, Mtime: cfs.Timespec{Sec: int64(j)}}
			if err := dir.AddChild(f); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := cfs.WriteImageFile(path, root, cfs.DefaultWriteOptions()); err != nil {
		t.Fatal(err)
	}
}

func manyInodes(t *testing.T, bin string) {
	// One image served under five names: five downloads, five parses.
	img := filepath.Join(t.TempDir(), "inodes.cfs")
	inodeImage(t, img)
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/images/inodes-") {
			http.NotFound(w, r)
			return
		}
		http.ServeFile(w, r, img)
	}))
	t.Cleanup(srv.Close)
	var vcs []map[string]string
	for i := range 5 {
		vcs = append(vcs, map[string]string{"repository": srv.URL, "image": fmt.Sprintf("inodes-%d.cfs", i)})
	}
	for _, budgets := range []bool{true, false} {
		name := map[bool]string{true: "budgets", false: "no budget"}[budgets]
		t.Run(name, func(t *testing.T) {
			var flags []string // the default --parse-memory
			if !budgets {
				flags = []string{"--parse-memory", "0"}
			}
			e := newBoundsEnv(t, bin, srv.URL, flags...)
			limit := goMemLimit
			if !budgets {
				// Five parses live at once exceed any soft limit that
				// fits: with one the runtime would only collect in vain.
				e.environ, limit = nil, "off"
			}
			p := e.start()
			got := publishAll(t, p, vcs)
			rss := peakRSS(t, p.cmd.Process.Pid)
			fmt.Printf("5 images of 330,000 inodes (%.1f MB each), %s: peak RSS %.1f MiB (GOMEMLIMIT %s)\n", float64(fi.Size())/1e6, name, mib(rss), limit)
			checkPeak(t, "image", got, rss, rssLimit, budgets, "without a parse budget")
		})
	}
}

// checkPeak checks a bounded run (every volume published, peak RSS under
// limit) or its control (the bound lifted: the peak must reach limit, or
// the test no longer measures anything).
func checkPeak(t *testing.T, what string, got []codes.Code, rss, limit int64, bounded bool, control string) {
	t.Helper()
	for i, c := range got {
		if c != codes.OK {
			t.Errorf("%s %d: %v, want published", what, i, c)
		}
	}
	if bounded && rss >= limit {
		t.Errorf("peak RSS %.1f MiB, want under %d MiB", mib(rss), limit>>20)
	}
	if !bounded && rss < limit {
		t.Errorf("control: %s the peak RSS was only %.1f MiB: this test no longer measures anything", control, mib(rss))
	}
}

// hugeObjectImage writes images/NAME holding one file backed by an object
// of claimed bytes, and returns that object's path in the repository.
func hugeObjectImage(t *testing.T, repo, name string, claimed uint64) string {
	d := cfs.Digest(sha256.Sum256([]byte(name)))
	root := &cfs.Node{Mode: cfs.ModeDir | 0o755, Nlink: 2}
	if err := root.AddChild(&cfs.Node{Name: "huge", Mode: cfs.ModeRegular | 0o644, Nlink: 1, Size: claimed, Payload: d.ObjectPath(), Digest: &d}); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(repo, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := cfs.WriteImageFile(filepath.Join(repo, "images", name), root, cfs.DefaultWriteOptions()); err != nil {
		t.Fatal(err)
	}
	return "/objects/" + d.ObjectPath()
}

func hugeObject(t *testing.T, bin string) {
	repo := t.TempDir()
	hugeObjectImage(t, repo, "huge.cfs", 100<<30)
	var requests atomic.Int64
	requested := make(chan struct{}, 1)
	files := http.FileServer(http.Dir(repo))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/objects/") {
			files.ServeHTTP(w, r)
			return
		}
		requests.Add(1)
		select {
		case requested <- struct{}{}:
		default:
		}
		// The claimed length, and zeros up to 64 MiB: enough to see the
		// download go on, not enough to fill the disk.
		w.Header().Set("Content-Length", strconv.FormatUint(100<<30, 10))
		chunk := make([]byte, 64<<10)
		for range 1024 {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}))
	t.Cleanup(srv.Close)
	for _, tc := range []struct {
		name  string
		flags []string
		image string
		want  codes.Code
	}{
		{"--max-object-size", nil, "huge.cfs", codes.ResourceExhausted},
		{"free space", []string{"--max-object-size", "0"}, "larger-than-free.cfs", codes.ResourceExhausted},
		{"no limit", []string{"--max-object-size", "0", "--min-free-space", "0"}, "huge.cfs", codes.OK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			requests.Store(0)
			e := newBoundsEnv(t, bin, srv.URL, tc.flags...)
			if tc.image == "larger-than-free.cfs" {
				// More than the store's filesystem has free, whatever the
				// machine (no size limit applies).
				if err := os.MkdirAll(e.store, 0o755); err != nil {
					t.Fatal(err)
				}
				var st syscall.Statfs_t
				if err := syscall.Statfs(e.store, &st); err != nil {
					t.Fatal(err)
				}
				hugeObjectImage(t, repo, tc.image, st.Bavail*uint64(st.Bsize)+1<<30)
			}
			p := e.start()
			vc := map[string]string{"repository": srv.URL, "image": tc.image}
			if tc.want == codes.OK {
				// The control: the object download starts; stop there.
				done := make(chan error, 1)
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				go func() {
					_, err := p.node.NodePublishVolume(ctx, publishReq("vol-huge", filepath.Join(t.TempDir(), "vol"), vc))
					done <- err
				}()
				select {
				case <-requested:
				case err := <-done:
					t.Fatalf("control: without limits the publish ended before requesting the object: %v", err)
				case <-time.After(time.Minute):
					t.Fatal("control: without limits the object was not requested within a minute")
				}
				fmt.Printf("image claiming a 100 GiB object, %s: the plugin downloads it; peak RSS %.1f MiB\n", tc.name, mib(peakRSS(t, p.cmd.Process.Pid)))
				p.kill()
				return
			}
			got := publishAll(t, p, []map[string]string{vc})
			rss := peakRSS(t, p.cmd.Process.Pid)
			fmt.Printf("image claiming a 100 GiB object, %s: %v after %d object requests; peak RSS %.1f MiB\n", tc.name, got[0], requests.Load(), mib(rss))
			if got[0] != tc.want {
				t.Errorf("publish: %v, want %v", got[0], tc.want)
			}
			if n := requests.Load(); n != 0 {
				t.Errorf("the object was requested %d times before refusing", n)
			}
			if rss >= rssLimit {
				t.Errorf("peak RSS %.1f MiB, want under %d MiB", mib(rss), rssLimit>>20)
			}
		})
	}
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }
