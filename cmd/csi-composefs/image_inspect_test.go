package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func inspectGoldenNames(t *testing.T) []string {
	m, err := filepath.Glob(golden("*.cfs"))
	if err != nil || len(m) == 0 {
		t.Fatalf("no golden images: %v", err)
	}
	var names []string
	for _, p := range m {
		names = append(names, strings.TrimSuffix(filepath.Base(p), ".cfs"))
	}
	return names
}

func TestImageDumpAndObjectsMatchComposefsInfo(t *testing.T) {
	for _, name := range inspectGoldenNames(t) {
		t.Run(name, func(t *testing.T) {
			img := golden(name + ".cfs")
			code, out, stderr := runCmd(t, "image", "dump", img)
			want, _ := os.ReadFile(golden(name + ".info.dump"))
			// No golden vector has a redirect whose length is a multiple
			// of 4, so composefs-info's off-by-one (format notes §2.15)
			// does not show and the dumps must be identical.
			if code != exitOK || out != string(want) {
				t.Errorf("dump: exit %d, stderr %q, output equal: %v", code, stderr, out == string(want))
			}
			code, out, stderr = runCmd(t, "image", "objects", img)
			want, _ = os.ReadFile(golden(name + ".objects"))
			if code != exitOK || out != string(want) {
				t.Errorf("objects: exit %d, stderr %q\n%s\nwant\n%s", code, stderr, out, want)
			}
			code, _, stderr = runCmd(t, "image", "objects", "--strict", img)
			if name == "inline-tail" {
				if code != exitFailure || !strings.Contains(stderr, "redirect") || !strings.Contains(stderr, "/meta-") {
					t.Errorf("--strict on inline-tail: exit %d, %q", code, stderr)
				}
			} else if code != exitOK {
				t.Errorf("--strict: exit %d, %q", code, stderr)
			}
		})
	}
}

func TestImageObjectsUnionAndBasedir(t *testing.T) {
	a, b := golden("basic.cfs"), golden("hardlink-whiteout.cfs")
	code, out, stderr := runCmd(t, "image", "objects", a, b)
	want, _ := os.ReadFile(golden("basic.objects")) // hardlink-whiteout's one object is in basic too
	if code != exitOK || out != string(want) {
		t.Fatalf("exit %d %q:\n%s", code, stderr, out)
	}
	store := t.TempDir()
	lines := strings.Split(strings.TrimSpace(string(want)), "\n")
	present := lines[0]
	if err := os.MkdirAll(filepath.Join(store, filepath.Dir(present)), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(store, present), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, stderr = runCmd(t, "image", "objects", "--basedir", store, a)
	if code != exitOK || out != strings.Join(lines[1:], "\n")+"\n" {
		t.Fatalf("--basedir: exit %d %q:\n%s", code, stderr, out)
	}
}

func TestImageLs(t *testing.T) {
	img := golden("basic.cfs")
	code, out, stderr := runCmd(t, "image", "ls", img)
	want := "/bigdev\n" +
		"/bigid\t@ 13/e9b8848ae484a36acb3f3cac0ceb2f7601e96633d15c92f9bd3dd44e492157\n" +
		"/blk\n/chr\n" +
		"/dir/\t\n" +
		"/dir/ext-4095\t@ 5f/4953aad672b0188023d6cd6fbce9d09508eb7dad165b6298ce0086bc1e72db\n" +
		"/dir/ext-4097\t@ b0/d074abef4d544404facfab6ba242f6a8ccbde90f1325cd286f3c8aa8d0f8aa\n" +
		"/dir/ext-5000\t@ 21/9c2df1dc52c12b7f666570d48b3f57c2e1ef58aa4734111f36773c8e731829\n" +
		"/dir/fifo\n/dir/sock\n/empty\n" +
		"/ext-1m\t@ 93/c995656d665b81c3a87eed032fcf06a8f9cecef51e3f5e5af7fa59fef1d439\n" +
		"/inline\n/newer\n/setuid\n" +
		"/symlink\t-> inline\n" +
		"/symlink-abs\t-> /usr/share/zoneinfo/UTC\n"
	if code != exitOK || out != want {
		t.Fatalf("exit %d %q:\n%s", code, stderr, out)
	}
	for _, tc := range []struct {
		path, want string
	}{
		{"/dir", "/dir/ext-4095\t@ 5f/4953aad672b0188023d6cd6fbce9d09508eb7dad165b6298ce0086bc1e72db\n" +
			"/dir/ext-4097\t@ b0/d074abef4d544404facfab6ba242f6a8ccbde90f1325cd286f3c8aa8d0f8aa\n" +
			"/dir/ext-5000\t@ 21/9c2df1dc52c12b7f666570d48b3f57c2e1ef58aa4734111f36773c8e731829\n" +
			"/dir/fifo\n/dir/sock\n"},
		{"dir/", "/dir/ext-4095\t@ 5f/4953aad672b0188023d6cd6fbce9d09508eb7dad165b6298ce0086bc1e72db\n" +
			"/dir/ext-4097\t@ b0/d074abef4d544404facfab6ba242f6a8ccbde90f1325cd286f3c8aa8d0f8aa\n" +
			"/dir/ext-5000\t@ 21/9c2df1dc52c12b7f666570d48b3f57c2e1ef58aa4734111f36773c8e731829\n" +
			"/dir/fifo\n/dir/sock\n"},
		{"/symlink", "/symlink\t-> inline\n"},
		{"/", want},
	} {
		code, out, stderr := runCmd(t, "image", "ls", img, tc.path)
		if code != exitOK || out != tc.want {
			t.Errorf("ls %s: exit %d %q:\n%s", tc.path, code, stderr, out)
		}
	}
	code, out, _ = runCmd(t, "image", "ls", "--filter", "symlink", "--filter", "dir", img)
	if code != exitOK || !strings.HasPrefix(out, "/dir/\t\n") || !strings.HasSuffix(out, "/dir/sock\n/symlink\t-> inline\n") {
		t.Errorf("--filter: exit %d:\n%s", code, out)
	}
	// Spaces stay literal in ls paths; other bytes are escaped.
	code, out, _ = runCmd(t, "image", "ls", golden("longnames-bigdir.cfs"))
	if code != exitOK || !strings.Contains(out, "\n/a b\n") || !strings.Contains(out, "\n/tab\\there\n") || !strings.Contains(out, "\n/\\xff\\xfe-binary\n") {
		t.Errorf("escaping: exit %d", code)
	}
}

func TestImageInspectErrors(t *testing.T) {
	img := golden("basic.cfs")
	notImage := golden("basic.dump")
	tests := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"image", "dump"}, exitUsage, "want 1 argument"},
		{[]string{"image", "dump", img, img}, exitUsage, "want 1 argument"},
		{[]string{"image", "ls"}, exitUsage, "arguments"},
		{[]string{"image", "ls", img, "/", "/dir"}, exitUsage, "arguments"},
		{[]string{"image", "objects"}, exitUsage, "at least 1"},
		{[]string{"image", "objects", "--no-such-flag", img}, exitUsage, "unknown flag"},
		{[]string{"image", "dump", "--filter", "a/b", img}, exitUsage, "--filter"},
		{[]string{"image", "objects", "--basedir", notImage, img}, exitUsage, "--basedir"},
		{[]string{"image", "dump", notImage}, exitFailure, "magic"},
		{[]string{"image", "dump", "/nonexistent/image.cfs"}, exitFailure, "no such file"},
		{[]string{"image", "ls", img, "/nope"}, exitFailure, "does not exist"},
	}
	for _, tc := range tests {
		code, _, stderr := runCmd(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.msg) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d mentioning %q", tc.args, code, stderr, tc.code, tc.msg)
		}
	}
	for _, sub := range []string{"dump", "ls", "objects"} {
		code, out, _ := runCmd(t, "image", sub, "--help")
		if code != exitOK || !strings.Contains(out, "composefs-info") || !strings.Contains(out, "--strict") {
			t.Errorf("%s --help: exit %d:\n%s", sub, code, out)
		}
	}
}
