package fetch

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestCrashSafety kills `csi-composefs pull` with SIGKILL at random moments
// 50 times. After each kill every file under objects/ and images/ still has
// the digest its name says; at the end `store verify` finds nothing corrupt
// and one more pull completes.
func TestCrashSafety(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := filepath.Join(t.TempDir(), "csi-composefs")
	build := exec.Command("go", "build", "-o", bin, "github.com/csi-composefs/csi-composefs/cmd/csi-composefs")
	buildStart := time.Now()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the binary: %v\n%s", err, out)
	}

	repo := t.TempDir()
	files := makeFiles("f", 71, 40, 200000)
	d := writeRepoImage(t, repo, "img.cfs", files)
	ts := newTestServer(t, repo)
	// Pace object bodies so that a pull lasts long enough to be cut anywhere.
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if !strings.HasPrefix(r.URL.Path, "/objects/") {
			return false
		}
		b, err := os.ReadFile(filepath.Join(repo, filepath.FromSlash(r.URL.Path)))
		if err != nil {
			http.NotFound(w, r)
			return true
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		for len(b) > 0 {
			k := min(len(b), 32<<10)
			if _, err := w.Write(b[:k]); err != nil {
				return true
			}
			w.(http.Flusher).Flush()
			b = b[k:]
			time.Sleep(time.Millisecond)
		}
		return true
	})
	root := t.TempDir()
	pull := func(ctx context.Context) *exec.Cmd {
		return exec.CommandContext(ctx, bin, "pull", "--store-dir", root, "--repository", ts.URL,
			"--fetch-concurrency", "4", "--progress", "none", "--digest", d.String(), "img.cfs")
	}

	// One timed pull (into a scratch store) to pick kill moments in its range.
	start := time.Now()
	scratch := t.TempDir()
	if out, err := exec.Command(bin, "pull", "--store-dir", scratch, "--repository", ts.URL,
		"--fetch-concurrency", "4", "--progress", "none", "img.cfs").CombinedOutput(); err != nil {
		t.Fatalf("reference pull: %v\n%s", err, out)
	}
	full := time.Since(start)
	seed := uint64(time.Now().UnixNano())
	t.Logf("build took %v; a pull takes %v; seed %d", start.Sub(buildStart), full, seed)
	rng := rand.New(rand.NewPCG(seed, 7))

	// Rounds killed with a partial download in tmp/ (none where the store
	// uses anonymous O_TMPFILE files, which vanish with the process).
	midDownload := 0
	for i := range 50 {
		// Every 5th round starts from an empty objects/ (as after a GC) so
		// that kills keep landing in the middle of downloads.
		if i%5 == 0 {
			subs, _ := filepath.Glob(filepath.Join(root, "objects", "*"))
			for _, sub := range subs {
				os.RemoveAll(sub)
			}
		}
		cmd := pull(context.Background())
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(rng.Int64N(int64(full)/2 + 1)))
		cmd.Process.Kill()
		cmd.Wait()
		if partial, _ := filepath.Glob(filepath.Join(root, "tmp", "*", "object-*")); len(partial) > 0 {
			midDownload++
		}
		checkStoredFiles(t, root)
		if t.Failed() {
			t.Fatalf("round %d: store invariant broken; pull said: %s", i, stderr.String())
		}
	}

	t.Logf("%d of 50 kills left a partial download behind", midDownload)
	out, err := exec.Command(bin, "store", "verify", "--store-dir", root).CombinedOutput()
	if err != nil || !strings.Contains(string(out), ": 0 corrupt") {
		t.Fatalf("store verify: %v\n%s", err, out)
	}
	if out, err := pull(context.Background()).CombinedOutput(); err != nil {
		t.Fatalf("final pull: %v\n%s", err, out)
	}
	checkInvariant(t, root)
	if !hasObjects(t, root, files) {
		t.Fatal("objects missing after the final pull")
	}
}

// checkStoredFiles is checkInvariant without the tmp/ check (a killed pull
// leaves partial downloads there until the next Open).
func checkStoredFiles(t *testing.T, root string) {
	t.Helper()
	// A pull killed before it opened the store left no directories.
	for _, d := range []string{"objects", "images"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	tmp := filepath.Join(root, "tmp")
	saved := filepath.Join(t.TempDir(), "tmp")
	if err := os.Rename(tmp, saved); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	os.Mkdir(tmp, 0o755)
	checkInvariant(t, root)
	os.RemoveAll(tmp)
	if err := os.Rename(saved, tmp); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
}
