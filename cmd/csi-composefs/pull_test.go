package main

import (
	"bytes"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/internal/testoci"
)

// TestPullAndStoreCommands publishes a directory with image build --repo,
// serves it, pulls it twice, and runs store du, verify and gc.
func TestPullAndStoreCommands(t *testing.T) {
	src := t.TempDir()
	for i, size := range []int{100, 5000, 70000} {
		b := make([]byte, size)
		for j := range b {
			b[j] = byte(j*7 + i)
		}
		os.WriteFile(filepath.Join(src, "f"+string(rune('a'+i))), b, 0o644)
	}
	repo := t.TempDir()
	code, stdout, stderr := runCmd(t, "image", "build", "--repo", repo, "--name", "app.cfs", src)
	if code != exitOK {
		t.Fatalf("image build --repo: %d %s", code, stderr)
	}
	digest := strings.TrimSpace(stdout)
	srv := httptest.NewServer(http.FileServer(http.Dir(repo)))
	t.Cleanup(srv.Close)
	store := t.TempDir()

	// A tree larger than --parse-memory is refused, naming the flag.
	code, _, stderr = runCmd(t, "pull", "--store-dir", t.TempDir(), "--repository", srv.URL, "--parse-memory", "1K", "app.cfs")
	if code != exitFailure || !strings.Contains(stderr, "--parse-memory") || !strings.Contains(stderr, "memory") {
		t.Errorf("pull with --parse-memory 1K: %d %s, want a failure naming --parse-memory", code, stderr)
	}
	code, stdout, stderr = runCmd(t, "pull", "--store-dir", store, "--repository", srv.URL, "--progress", "plain", "--digest", digest, "app.cfs")
	if code != exitOK || !strings.Contains(stdout, digest) {
		t.Fatalf("pull: %d %q %s", code, stdout, stderr)
	}
	if !strings.Contains(stderr, "fetched 3") {
		t.Errorf("pull summary: %s", stderr)
	}
	code, _, stderr = runCmd(t, "pull", "--store-dir", store, "--repository", srv.URL, "--progress", "plain", "app.cfs")
	if code != exitOK || !strings.Contains(stderr, "fetched 0") {
		t.Fatalf("second pull: %d %s", code, stderr)
	}
	code, stdout, _ = runCmd(t, "store", "du", "--store-dir", store)
	if code != exitOK || !strings.Contains(stdout, "objects") || !strings.Contains(stdout, "signatures") {
		t.Errorf("store du: %d %s", code, stdout)
	}
	code, stdout, _ = runCmd(t, "store", "verify", "--store-dir", store)
	if code != exitOK || !strings.Contains(stdout, "3 objects and 1 images") {
		t.Errorf("store verify: %d %s", code, stdout)
	}
	code, stdout, _ = runCmd(t, "store", "gc", "--store-dir", store, "--store-max-size", "1")
	if code != exitOK || !strings.Contains(stdout, "removed 1 images and 3 objects") {
		t.Errorf("store gc: %d %s", code, stdout)
	}

	// Failures: 404 is exit 1, usage errors exit 2.
	if code, _, stderr = runCmd(t, "pull", "--store-dir", store, "--repository", srv.URL, "--retries", "0", "missing.cfs"); code != exitFailure {
		t.Errorf("pull of a missing image: exit %d %s", code, stderr)
	}
	for _, args := range [][]string{
		{"pull", "--store-dir", store, "app.cfs"},
		{"pull", "--store-dir", store, "--repository", srv.URL, "a/b"},
		{"pull", "--store-dir", store, "--repository", srv.URL, "--digest", "xyz", "app.cfs"},
		{"store", "gc", "--store-dir", store, "--store-max-size", "lots"},
	} {
		if code, _, _ := runCmd(t, args...); code != exitUsage {
			t.Errorf("%v: exit %d, want %d", args, code, exitUsage)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "10": 10, "2K": 2048, "3m": 3 << 20, "1G": 1 << 30, "2T": 2 << 40} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "-1", "1.5G", "G"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) accepted", bad)
		}
	}
}

// pull docker://… shows the conversion's progress (the layers' bytes as
// they come, the objects written), then the objects', as for HTTP.
func TestPullContainerImageProgress(t *testing.T) {
	reg := testoci.NewRegistry(t, testoci.Options{})
	big := strings.Repeat("0123456789abcdef", 40<<10)
	l1 := testoci.Layer(t, []testoci.Entry{testoci.Dir("usr/"), testoci.File("usr/a", big+"a"), testoci.File("usr/b", big+"b")})
	l2 := testoci.Layer(t, []testoci.Entry{testoci.File("usr/c", big+"c")})
	img := testoci.Image(t, l1, l2)
	testoci.Push(t, reg.Host, "app:1", img, "", "")
	var layerBytes int64
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		n, err := l.Size()
		if err != nil {
			t.Fatal(err)
		}
		layerBytes += n
	}
	store := t.TempDir()
	ref := "docker://" + reg.Host + "/app:1"
	code, stdout, stderr := runCmd(t, "pull", "--store-dir", store, "--insecure-registry", reg.Host, "--progress", "bar", ref)
	if code != exitOK || len(strings.TrimSpace(stdout)) != 64 {
		t.Fatalf("pull %s: %d %q %s", ref, code, stdout, stderr)
	}
	// The conversion's last bar line: every layer byte, the three objects.
	want := fmt.Sprintf("3/3 objects  %s/%s", human(layerBytes), human(layerBytes))
	if !strings.Contains(stderr, want) {
		t.Errorf("no conversion progress %q in:\n%s", want, stderr)
	}
	if !strings.Contains(stderr, "3 objects written") {
		t.Errorf("no conversion summary in:\n%s", stderr)
	}
}

// A pull fetches the objects under a soft memory limit of the live heap
// plus objectsHeadroom (at least objectsMemoryFloor), unless GOMEMLIMIT
// sets one.
func TestPullLimitsObjectsMemory(t *testing.T) {
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "f"), bytes.Repeat([]byte("x"), 5000), 0o644)
	repo := t.TempDir()
	if code, _, stderr := runCmd(t, "image", "build", "--repo", repo, "--name", "app.cfs", src); code != exitOK {
		t.Fatalf("image build --repo: %d %s", code, stderr)
	}
	srv := httptest.NewServer(http.FileServer(http.Dir(repo)))
	t.Cleanup(srv.Close)
	old := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(old) })
	env, had := os.LookupEnv("GOMEMLIMIT")
	os.Unsetenv("GOMEMLIMIT")
	t.Cleanup(func() {
		if had {
			os.Setenv("GOMEMLIMIT", env)
		}
	})
	for _, c := range []struct {
		name, env string
		want      func(int64) bool
	}{
		{"set", "", func(l int64) bool { return l >= objectsMemoryFloor && l < objectsMemoryFloor+objectsHeadroom+64<<20 }},
		{"GOMEMLIMIT rules", "1GiB", func(l int64) bool { return l == math.MaxInt64 }},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.env != "" {
				t.Setenv("GOMEMLIMIT", c.env)
			}
			debug.SetMemoryLimit(math.MaxInt64)
			if code, _, stderr := runCmd(t, "pull", "--store-dir", t.TempDir(), "--repository", srv.URL, "--progress", "none", "app.cfs"); code != exitOK {
				t.Fatalf("pull: %d %s", code, stderr)
			}
			if l := debug.SetMemoryLimit(-1); !c.want(l) {
				t.Errorf("memory limit %d after the pull", l)
			}
		})
	}
}
