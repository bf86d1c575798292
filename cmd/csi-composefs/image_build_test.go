package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/fetch/pack"
)

// runCmd runs the CLI in-process and returns its exit code and output.
func runCmd(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	root := newRootCmd()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	code := runWith(root, args, &errOut)
	return code, out.String(), errOut.String()
}

func golden(name string) string { return filepath.Join("..", "..", "testdata", "composefs", name) }

func TestImageBuildFromFileMatchesGolden(t *testing.T) {
	for _, tt := range []struct {
		vector string
		dump   string
		flags  []string
	}{
		{"basic", "basic.dump", nil},
		{"basic.v1", "basic.dump", []string{"--min-version", "1"}},
		{"hardlink-whiteout", "hardlink-whiteout.dump", nil},
		{"hardlink-whiteout.v0", "hardlink-whiteout.dump", []string{"--max-version", "0"}},
		{"xattrs", "xattrs.dump", nil},
	} {
		t.Run(tt.vector, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out.cfs")
			args := append([]string{"image", "build", "--from-file", "--print-digest"}, tt.flags...)
			code, stdout, stderr := runCmd(t, append(args, golden(tt.dump), out)...)
			if code != exitOK {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			want, _ := os.ReadFile(golden(tt.vector + ".cfs"))
			got, _ := os.ReadFile(out)
			if !bytes.Equal(got, want) {
				t.Errorf("image differs from %s.cfs", tt.vector)
			}
			wantDigest, _ := os.ReadFile(golden(tt.vector + ".digest"))
			if stdout != string(wantDigest) {
				t.Errorf("printed %q, want %q", stdout, wantDigest)
			}
		})
	}
}

func TestImageBuildStdinStdout(t *testing.T) {
	dump, _ := os.ReadFile(golden("minimal.dump"))
	root := newRootCmd()
	var out, errOut bytes.Buffer
	root.SetIn(bytes.NewReader(dump))
	root.SetOut(&out)
	root.SetErr(&errOut)
	if code := runWith(root, []string{"image", "build", "--from-file", "-", "-"}, &errOut); code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	want, _ := os.ReadFile(golden("minimal.cfs"))
	if !bytes.Equal(out.Bytes(), want) {
		t.Errorf("stdout image differs from minimal.cfs")
	}
}

func TestImageBuildDirectoryWithStore(t *testing.T) {
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "big"), bytes.Repeat([]byte("x"), 5000), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "small"), []byte("hi"), 0o644); err != nil {
		t.Fatal(err)
	}
	store := filepath.Join(t.TempDir(), "objects")
	img := filepath.Join(t.TempDir(), "img.cfs")
	code, stdout, stderr := runCmd(t, "image", "build", "--digest-store", store, "--print-digest", src, img)
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	code, digestOut, _ := runCmd(t, "image", "digest", img)
	if code != exitOK || !strings.HasPrefix(digestOut, "sha256:"+strings.TrimSpace(stdout)+" ") {
		t.Errorf("build printed %q; image digest printed %q", stdout, digestOut)
	}
	code, onlyOut, _ := runCmd(t, "image", "build", "--print-digest-only", src)
	if code != exitOK || onlyOut != stdout {
		t.Errorf("--print-digest-only printed %q, want %q", onlyOut, stdout)
	}
	objs, _ := filepath.Glob(filepath.Join(store, "*", "*"))
	if len(objs) != 1 {
		t.Errorf("store holds %v, want the one external file", objs)
	}
}

func TestImageBuildErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.dump")
	os.WriteFile(bad, []byte("/ 0 100644 1 0 0 0 0.0 - - -\n"), 0o644)
	out := filepath.Join(dir, "out.cfs")
	for _, tt := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"image", "build", dir}, exitUsage, "want 2 argument"},
		{[]string{"image", "build", "--min-version", "2", dir, out}, exitUsage, "--min-version must be 0..1"},
		{[]string{"image", "build", "--from-file", "--digest-store", dir, bad, out}, exitUsage, "apply to directory input"},
		{[]string{"image", "build", "--print-digest", dir, "-"}, exitUsage, "would mix the digest"},
		{[]string{"image", "build", "--bogus", dir, out}, exitUsage, "unknown flag"},
		{[]string{"image", "build", "--from-file", bad, out}, exitFailure, "root must be a directory"},
		{[]string{"image", "build", filepath.Join(dir, "missing"), out}, exitFailure, "no such file"},
	} {
		code, _, stderr := runCmd(t, tt.args...)
		if code != tt.code || !strings.Contains(stderr, tt.msg) {
			t.Errorf("%q: exit %d, stderr %q; want exit %d and %q", tt.args, code, stderr, tt.code, tt.msg)
		}
	}
	if _, err := os.Stat(out); err == nil {
		t.Errorf("a failed build left %s behind", out)
	}
}

func TestImageBuildIntoRepo(t *testing.T) {
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "big"), bytes.Repeat([]byte("y"), 9000), 0o644)
	repo := t.TempDir()
	code, stdout, stderr := runCmd(t, "image", "build", "--repo", repo, "--name", "app-1.cfs", src)
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	digest := strings.TrimSpace(stdout)
	code, out, _ := runCmd(t, "image", "digest", filepath.Join(repo, "images", "app-1.cfs"))
	if code != exitOK || !strings.HasPrefix(out, "sha256:"+digest) {
		t.Errorf("published image digest %q, build printed %q", out, digest)
	}
	if objs, _ := filepath.Glob(filepath.Join(repo, "objects", "*", "*")); len(objs) != 1 {
		t.Errorf("repository objects %v, want 1", objs)
	}
	for _, args := range [][]string{
		{"image", "build", "--repo", repo, src},
		{"image", "build", "--repo", repo, "--name", "x", src, "extra"},
		{"image", "build", "--repo", repo, "--name", "x", "--from-file", src},
		{"image", "build", "--repo", repo, "--name", "../escape", src},
	} {
		if code, _, _ := runCmd(t, args...); code != exitUsage {
			t.Errorf("%q: exit %d, want %d", args, code, exitUsage)
		}
	}
}

// TestImageBuildParseStrict: like mkcomposefs, dumpfiles are parsed
// leniently by default and strictly with --parse-strict or when
// CFS_PARSE_STRICT is set, even to an empty value.
func TestImageBuildParseStrict(t *testing.T) {
	dump := filepath.Join(t.TempDir(), "short.dump")
	// The second line stops after PAYLOAD (9 of 11 fields) and has no newline.
	if err := os.WriteFile(dump, []byte("/ 0 40755 2 0 0 0 0.0 - - -\n/l 0 120777 1 0 0 0 0.0 target"), 0o644); err != nil {
		t.Fatal(err)
	}
	build := func(extra ...string) (int, string) {
		out := filepath.Join(t.TempDir(), "out.cfs")
		code, _, stderr := runCmd(t, append(append([]string{"image", "build", "--from-file"}, extra...), dump, out)...)
		return code, stderr
	}
	if code, stderr := build(); code != exitOK {
		t.Fatalf("lenient parse: exit %d: %s", code, stderr)
	}
	if code, stderr := build("--parse-strict"); code == exitOK || !strings.Contains(stderr, "missing trailing newline") {
		t.Errorf("--parse-strict: exit %d: %s", code, stderr)
	}
	t.Setenv("CFS_PARSE_STRICT", "")
	if code, stderr := build(); code == exitOK || !strings.Contains(stderr, "line 2") {
		t.Errorf("CFS_PARSE_STRICT set: exit %d: %s", code, stderr)
	}
	if code, _, stderr := runCmd(t, "image", "build", "--parse-strict", t.TempDir(), filepath.Join(t.TempDir(), "x.cfs")); code != exitUsage {
		t.Errorf("--parse-strict without --from-file: exit %d: %s", code, stderr)
	}
}

// TestImageBuildIntoRepoPacks: --repo packs objects up to
// --pack-max-object into REPO/packs/ with the image's pack index by
// default, --packs=false writes none, and bad pack flags are usage errors.
func TestImageBuildIntoRepoPacks(t *testing.T) {
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "small"), bytes.Repeat([]byte("s"), 2000), 0o644)
	os.WriteFile(filepath.Join(src, "big"), bytes.Repeat([]byte("y"), 9000), 0o644)
	build := func(extra ...string) (string, string) {
		t.Helper()
		repo := t.TempDir()
		code, stdout, stderr := runCmd(t, append(append([]string{"image", "build", "--repo", repo, "--name", "app.cfs"}, extra...), src)...)
		if code != exitOK {
			t.Fatalf("%q: exit %d: %s", extra, code, stderr)
		}
		return repo, strings.TrimSpace(stdout)
	}
	packed := func(repo, digest string) int {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(repo, "packs", digest+".idx"))
		if err != nil {
			return -1
		}
		x, err := pack.DecodeRepoIndex(b)
		if err != nil || x.Image.String() != digest {
			t.Fatalf("pack index: %v", err)
		}
		return len(x.Index.Entries)
	}
	repo, d := build()
	if n := packed(repo, d); n != 2 {
		t.Errorf("default build: %d objects packed, want 2", n)
	}
	if tars, _ := filepath.Glob(filepath.Join(repo, "packs", "*.tar")); len(tars) != 1 {
		t.Errorf("default build: packs %v, want 1", tars)
	}
	if repo, d := build("--pack-max-object", "4K"); packed(repo, d) != 1 {
		t.Errorf("--pack-max-object 4K: %d objects packed, want 1", packed(repo, d))
	}
	repo, _ = build("--packs=false")
	if _, err := os.Stat(filepath.Join(repo, "packs")); err == nil {
		t.Errorf("--packs=false wrote packs/")
	}
	out := filepath.Join(t.TempDir(), "x.cfs")
	for _, tt := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--repo", t.TempDir(), "--name", "a", "--pack-size", "10", src}, "--pack-size: want at least 1M"},
		{[]string{"--repo", t.TempDir(), "--name", "a", "--pack-size", "lots", src}, "--pack-size"},
		{[]string{"--repo", t.TempDir(), "--name", "a", "--pack-max-object", "0", src}, "--pack-max-object: want a size"},
		{[]string{"--repo", t.TempDir(), "--name", "a", "--packs=maybe", src}, "invalid argument"},
		{[]string{"--packs=false", src, out}, "--packs goes with --repo"},
		{[]string{"--pack-size", "2M", src, out}, "--pack-size goes with --repo"},
	} {
		code, _, stderr := runCmd(t, append([]string{"image", "build"}, tt.args...)...)
		if code != exitUsage || !strings.Contains(stderr, tt.msg) {
			t.Errorf("%q: exit %d, %q; want exit %d and %q", tt.args, code, stderr, exitUsage, tt.msg)
		}
	}
	code, help, _ := runCmd(t, "image", "build", "--help")
	for _, f := range []string{"--packs", "--pack-max-object", "--pack-size"} {
		if code != exitOK || !strings.Contains(help, f) {
			t.Errorf("image build --help does not show %s", f)
		}
	}
}
