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

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// TestCrashSafety kills `csi-composefs pull` with SIGKILL at random moments
// 50 times, once with objects downloaded into anonymous O_TMPFILE files and
// once into named files under tmp/ (filesystems without O_TMPFILE). After
// each kill every file under objects/ and images/ still has the digest its
// name says; with O_TMPFILE no partial object is left in tmp/ (only a named
// image download may be); with named files some kills leave partial
// objects there; and the next open of the store leaves tmp/ empty, as the
// README says. At the end `store verify` finds nothing corrupt and one
// more pull completes.
//
// The kill moments come from a seed the test prints; CRASH_SEED=N replays
// them. A SIGKILL cannot test durability (the kernel still writes back
// what a killed process wrote: dropping every fsync and syncfs passes
// here); that needs a power cut, which only a virtual machine gives.
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
	t.Logf("build took %v", time.Since(buildStart))
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("CRASH_SEED"); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("CRASH_SEED=%q: %v", v, err)
		}
	}
	t.Logf("seed %d (replay with CRASH_SEED=%d)", seed, seed)

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
	for i, named := range []bool{false, true} {
		name := map[bool]string{false: "O_TMPFILE", true: "named"}[named]
		t.Run(name, func(t *testing.T) {
			crashRounds(t, bin, ts.URL, d, files, named, seed+uint64(i))
		})
	}
}

func crashRounds(t *testing.T, bin, url string, d cfs.Digest, files []testFile, named bool, seed uint64) {
	root := t.TempDir()
	args := func(store string) []string {
		a := []string{"pull", "--store-dir", store, "--repository", url, "--fetch-concurrency", "4", "--progress", "none"}
		if named {
			a = append(a, "--named-temp-files")
		}
		return a
	}
	pull := func() *exec.Cmd {
		return exec.Command(bin, append(args(root), "--digest", d.String(), "img.cfs")...)
	}

	// One timed pull (into a scratch store) to pick kill moments in its range.
	start := time.Now()
	if out, err := exec.Command(bin, append(args(t.TempDir()), "img.cfs")...).CombinedOutput(); err != nil {
		t.Fatalf("reference pull: %v\n%s", err, out)
	}
	full := time.Since(start)
	t.Logf("a pull takes %v", full)
	rng := rand.New(rand.NewPCG(seed, 7))

	// Rounds killed with a partial object download in tmp/ (never where
	// the store uses anonymous O_TMPFILE files, which vanish with the
	// process), and with a partial image download (always a named file).
	midObject, midImage := 0, 0
	for i := range 50 {
		// Every 5th round starts from an empty objects/ (as after a GC) so
		// that kills keep landing in the middle of downloads.
		if i%5 == 0 {
			subs, _ := filepath.Glob(filepath.Join(root, "objects", "*"))
			for _, sub := range subs {
				os.RemoveAll(sub)
			}
		}
		if i%10 == 0 { // and now and then without the image
			os.RemoveAll(filepath.Join(root, "images"))
		}
		cmd := pull()
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(rng.Int64N(int64(full)/2 + 1)))
		cmd.Process.Kill()
		cmd.Wait()
		partialObjects, _ := filepath.Glob(filepath.Join(root, "tmp", "*", "object-*"))
		partialImages, _ := filepath.Glob(filepath.Join(root, "tmp", "image-*"))
		if len(partialObjects) > 0 {
			midObject++
			if !named {
				t.Fatalf("round %d: partial objects in tmp/ although the store uses O_TMPFILE: %v", i, partialObjects)
			}
		}
		if len(partialImages) > 0 {
			midImage++
		}
		checkStoredFiles(t, root)
		if t.Failed() {
			t.Fatalf("round %d: store invariant broken; pull said: %s", i, stderr.String())
		}
		// The next open clears what the kill left in tmp/.
		s, err := Open(context.Background(), root, Options{})
		if err != nil {
			t.Fatalf("round %d: opening the store after the kill: %v", i, err)
		}
		s.Close()
		checkInvariant(t, root)
		if t.Failed() {
			t.Fatalf("round %d: tmp/ not cleared by the next open (partial objects %v, images %v)", i, partialObjects, partialImages)
		}
	}
	t.Logf("%d of 50 kills left a partial object download in tmp/, %d a partial image", midObject, midImage)
	if named && midObject == 0 {
		t.Errorf("no kill landed in the middle of a named object download (seed %d): the clearing of tmp/ was not exercised", seed)
	}

	out, err := exec.Command(bin, "store", "verify", "--store-dir", root).CombinedOutput()
	if err != nil || !strings.Contains(string(out), ": 0 corrupt") {
		t.Fatalf("store verify: %v\n%s", err, out)
	}
	if out, err := pull().CombinedOutput(); err != nil {
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
