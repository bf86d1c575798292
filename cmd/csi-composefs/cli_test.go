package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// publishTree builds a small repository of one image with three objects
// and returns the repository directory and the image digest.
func publishTree(t *testing.T, name string, seed byte) (repo, digest string) {
	t.Helper()
	src := t.TempDir()
	for i, size := range []int{100, 5000, 70000} {
		if err := os.WriteFile(filepath.Join(src, "f"+string(rune('a'+i))), bytes.Repeat([]byte{seed + byte(i)}, size), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	repo = t.TempDir()
	code, stdout, stderr := runCmd(t, "image", "build", "--repo", repo, "--name", name, src)
	if code != exitOK {
		t.Fatalf("image build --repo: %d %s", code, stderr)
	}
	return repo, strings.TrimSpace(stdout)
}

// entries lists what is under dir (relative paths), or nil.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && p != dir && !d.IsDir() {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	return out
}

// TestZeroDigestRefused: 64 zeros is no digest; every place a user gives
// one refuses it as invalid input.
func TestZeroDigestRefused(t *testing.T) {
	zero := strings.Repeat("0", 64)
	repo, _ := publishTree(t, "app.cfs", 1)
	srv := httptest.NewServer(http.FileServer(http.Dir(repo)))
	defer srv.Close()
	store := filepath.Join(t.TempDir(), "store")
	img := filepath.Join("..", "..", "testdata", "composefs", "minimal.cfs")
	for _, args := range [][]string{
		{"pull", "--store-dir", store, "--repository", srv.URL, "--digest", zero, "app.cfs"},
		{"pull", "--store-dir", store, "--repository", srv.URL, "--digest", "sha256:" + zero, "app.cfs"},
		{"image", "mount", "--objects", t.TempDir(), "--digest", zero, img, t.TempDir()},
	} {
		code, _, stderr := runCmd(t, args...)
		if code != exitUsage || !strings.Contains(stderr, "--digest") || !strings.Contains(stderr, "all-zero") {
			t.Errorf("%q: exit %d, %s; want a usage error naming --digest", args, code, stderr)
		}
	}
	if _, err := os.Stat(store); err == nil {
		t.Error("a refused pull made a store")
	}
}

// TestPullWrongDigest: an image whose digest is not the one asked for is
// refused (exit 1) and nothing of it is kept.
func TestPullWrongDigest(t *testing.T) {
	repo, digest := publishTree(t, "app.cfs", 2)
	srv := httptest.NewServer(http.FileServer(http.Dir(repo)))
	defer srv.Close()
	store := t.TempDir()
	other := "ab" + digest[2:]
	if other == digest {
		other = "cd" + digest[2:]
	}
	code, stdout, stderr := runCmd(t, "pull", "--store-dir", store, "--repository", srv.URL, "--retries", "0", "--digest", other, "app.cfs")
	if code != exitFailure || !strings.Contains(stderr, "digest mismatch") || stdout != "" {
		t.Fatalf("exit %d, stdout %q, stderr %s; want exit 1 and a digest mismatch", code, stdout, stderr)
	}
	for _, d := range []string{"images", "objects", "tmp"} {
		if got := entries(t, filepath.Join(store, d)); len(got) != 0 {
			t.Errorf("%s/ keeps %v after a refused pull", d, got)
		}
	}
	// The right digest then pulls.
	if code, _, stderr := runCmd(t, "pull", "--store-dir", store, "--repository", srv.URL, "--digest", digest, "app.cfs"); code != exitOK {
		t.Fatalf("pull with the right digest: %d %s", code, stderr)
	}
}

// TestUnknownSubcommand: an unknown command under a group is a usage error,
// as at the top level, not a help page with exit 0.
func TestUnknownSubcommand(t *testing.T) {
	for _, args := range [][]string{{"image", "biuld"}, {"store", "biuld"}, {"biuld"}, {"image", "biuld", "x"}} {
		code, stdout, stderr := runCmd(t, args...)
		if code != exitUsage || !strings.Contains(stderr, `unknown command "biuld"`) || stdout != "" {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit 2 and unknown command", args, code, stdout, stderr)
		}
	}
	if _, _, stderr := runCmd(t, "image", "biuld"); !strings.Contains(stderr, "did you mean build?") {
		t.Errorf("no suggestion: %s", stderr)
	}
	for _, group := range []string{"image", "store"} {
		if code, stdout, _ := runCmd(t, group); code != exitOK || !strings.Contains(stdout, "Available Commands") {
			t.Errorf("%s alone: exit %d, %q; want its help", group, code, stdout)
		}
	}
}

// TestUsageErrorsPointAtTheSubcommand: one prefix naming the command, and
// the hint names that command's --help.
func TestUsageErrorsPointAtTheSubcommand(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"image", "build"}, "csi-composefs image build: want 2 argument(s), got 0\nRun 'csi-composefs image build --help' for usage.\n"},
		{[]string{"image", "mount", "a", "b"}, "csi-composefs image mount: required flag(s) \"objects\" not set\nRun 'csi-composefs image mount --help' for usage.\n"},
		{[]string{"store", "gc", "--bogus"}, "csi-composefs store gc: unknown flag: --bogus\nRun 'csi-composefs store gc --help' for usage.\n"},
		{[]string{"pull", "--store", "x", "a"}, "csi-composefs pull: unknown flag: --store\nRun 'csi-composefs pull --help' for usage.\n"},
	} {
		code, _, stderr := runCmd(t, tt.args...)
		if code != exitUsage || stderr != tt.want {
			t.Errorf("%q: exit %d, stderr %q; want %q", tt.args, code, stderr, tt.want)
		}
	}
	code, stdout, _ := runCmd(t, "image", "mount", "--help")
	if code != exitOK || !strings.Contains(stdout, "csi-composefs image mount --objects DIR [--objects DIR]...") || !strings.Contains(stdout, "required") {
		t.Errorf("image mount --help does not show --objects as required:\n%s", stdout)
	}
}

// TestFlagNames: the store flags have one name across pull, store and serve.
func TestFlagNames(t *testing.T) {
	root := newRootCmd()
	for path, flags := range map[string][]string{
		"pull":         {"store-dir", "extra-object-dir", "fetch-concurrency", "max-image-size"},
		"store gc":     {"store-dir", "store-max-size"},
		"store verify": {"store-dir"},
		"store du":     {"store-dir"},
		"serve":        {"store-dir", "extra-object-dir", "fetch-concurrency", "store-max-size", "max-image-size"},
	} {
		cmd, _, err := root.Find(strings.Fields(path))
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range flags {
			if cmd.Flags().Lookup(f) == nil {
				t.Errorf("%s has no --%s", path, f)
			}
		}
		for _, old := range []string{"store", "extra-objects", "parallel"} {
			if cmd.Flags().Lookup(old) != nil {
				t.Errorf("%s still has --%s", path, old)
			}
		}
	}
}

// TestStoreCommandsRefuseWhatIsNotAStore: store du, gc and verify on a
// mistyped path, an empty directory or an HTTP repository refuse it and
// create nothing there; only pull (and serve) make a store.
func TestStoreCommandsRefuseWhatIsNotAStore(t *testing.T) {
	repo, digest := publishTree(t, "app.cfs", 3)
	empty := t.TempDir()
	missing := filepath.Join(t.TempDir(), "sotre")
	repoFiles := entries(t, repo)
	for _, dir := range []string{missing, empty, repo} {
		for _, sub := range []string{"du", "gc", "verify"} {
			code, _, stderr := runCmd(t, "store", sub, "--store-dir", dir)
			if code != exitUsage || !strings.Contains(stderr, "not a csi-composefs store") {
				t.Errorf("store %s on %s: exit %d, %s; want a usage error", sub, dir, code, stderr)
			}
		}
	}
	if _, err := os.Stat(missing); err == nil {
		t.Error("a store was created at the mistyped path")
	}
	if got := entries(t, empty); len(got) != 0 {
		t.Errorf("the empty directory now holds %v", got)
	}
	if got := entries(t, repo); strings.Join(got, " ") != strings.Join(repoFiles, " ") {
		t.Errorf("the repository changed: %v, was %v", got, repoFiles)
	}
	// A store pull made is one.
	srv := httptest.NewServer(http.FileServer(http.Dir(repo)))
	defer srv.Close()
	store := filepath.Join(t.TempDir(), "store")
	if code, _, stderr := runCmd(t, "pull", "--store-dir", store, "--repository", srv.URL, "--digest", digest, "app.cfs"); code != exitOK {
		t.Fatalf("pull: %d %s", code, stderr)
	}
	for _, sub := range []string{"du", "gc", "verify"} {
		if code, _, stderr := runCmd(t, "store", sub, "--store-dir", store); code != exitOK {
			t.Errorf("store %s on a store: exit %d %s", sub, code, stderr)
		}
	}
}

// TestImageBuildRepoKeepsAnotherImage: image build --repo refuses to
// replace images/NAME of other content unless --force; the same content
// again is fine.
func TestImageBuildRepoKeepsAnotherImage(t *testing.T) {
	src1, src2 := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(src1, "f"), bytes.Repeat([]byte("1"), 9000), 0o644)
	os.WriteFile(filepath.Join(src2, "f"), bytes.Repeat([]byte("2"), 9000), 0o644)
	repo := t.TempDir()
	build := func(src string, extra ...string) (int, string, string) {
		return runCmd(t, append(append([]string{"image", "build", "--repo", repo, "--name", "app.cfs"}, extra...), src)...)
	}
	imageDigest := func() string {
		d, err := digestFile(filepath.Join(repo, "images", "app.cfs"))
		if err != nil {
			t.Fatal(err)
		}
		return d.String()
	}
	code, d1, stderr := build(src1)
	if code != exitOK {
		t.Fatalf("first build: %d %s", code, stderr)
	}
	d1 = strings.TrimSpace(d1)
	if code, _, stderr := build(src2); code != exitFailure || !strings.Contains(stderr, "--force") {
		t.Errorf("replacing with other content: exit %d, %s; want exit 1 pointing at --force", code, stderr)
	}
	if got := imageDigest(); got != d1 {
		t.Errorf("images/app.cfs is now %s, want it kept as %s", got, d1)
	}
	if code, out, stderr := build(src1); code != exitOK || strings.TrimSpace(out) != d1 {
		t.Errorf("the same content again: exit %d, %q %s", code, out, stderr)
	}
	code, d2, stderr := build(src2, "--force")
	if code != exitOK || imageDigest() != strings.TrimSpace(d2) || strings.TrimSpace(d2) == d1 {
		t.Errorf("--force: exit %d, %s; images/app.cfs %s", code, stderr, imageDigest())
	}
	if code, _, _ := runCmd(t, "image", "build", "--force", src1, filepath.Join(t.TempDir(), "x.cfs")); code != exitUsage {
		t.Errorf("--force without --repo: exit %d", code)
	}
}

// TestImageMountChecksTheImage: a truncated image is refused before any
// mount; objects the image needs in none of the --objects directories give
// a warning.
func TestImageMountChecksTheImage(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipped: needs root to mount erofs and overlayfs for real (CI runs as root)")
	}
	src := t.TempDir()
	for i := 0; i < 40; i++ {
		os.WriteFile(filepath.Join(src, "file"+strings.Repeat("x", i)), bytes.Repeat([]byte{byte(i)}, 1000+i), 0o644)
	}
	objects := t.TempDir()
	img := filepath.Join(t.TempDir(), "app.cfs")
	if code, _, stderr := runCmd(t, "image", "build", "--digest-store", objects, src, img); code != exitOK {
		t.Fatalf("build: %s", stderr)
	}
	data := mustRead(t, img)
	if len(data) < 8192 {
		t.Fatalf("image of %d bytes is too small to truncate at a block", len(data))
	}
	truncated := filepath.Join(t.TempDir(), "truncated.cfs")
	if err := os.WriteFile(truncated, data[:len(data)/4096/2*4096], 0o644); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	os.Mkdir(mnt, 0o755)
	t.Cleanup(func() { cfs.Unmount(mnt, true) })

	code, _, stderr := runCmd(t, "image", "mount", "--objects", objects, truncated, mnt)
	if code != exitFailure || !strings.Contains(stderr, "not a valid composefs image") {
		t.Errorf("truncated image: exit %d, %s; want exit 1 saying it is not valid", code, stderr)
	}
	if _, mounted, _ := cfs.IsMounted(mnt); mounted {
		t.Fatal("the truncated image was mounted")
	}

	code, _, stderr = runCmd(t, "image", "mount", "--objects", t.TempDir(), img, mnt)
	if code != exitOK || !strings.Contains(stderr, "warning: 40 of 40 objects the image needs are in none of the --objects directories") {
		t.Errorf("objects elsewhere: exit %d, %q; want a warning", code, stderr)
	}
	if code := run([]string{"image", "umount", mnt}); code != exitOK {
		t.Fatal("umount")
	}
	code, _, stderr = runCmd(t, "image", "mount", "--objects", t.TempDir(), "--objects", objects, img, mnt)
	if code != exitOK || strings.Contains(stderr, "warning") {
		t.Errorf("objects present: exit %d, %q; want no warning", code, stderr)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "filexxx")); err != nil || len(b) != 1003 {
		t.Errorf("reading through the mount: %d bytes, %v", len(b), err)
	}
	run([]string{"image", "umount", mnt})
}
