package cfs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const rootLine = "/ 0 40755 2 0 0 0 0.0 - - -\n"

func TestParseDumpErrors(t *testing.T) {
	tests := []struct {
		name  string
		in    string
		opts  DumpOptions
		error string // substring of the message
	}{
		{"empty input", "", DumpOptions{}, "no root"},
		{"root not a dir", "/ 0 100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "root must be a directory"},
		{"two roots", rootLine + rootLine, DumpOptions{}, "more than one root"},
		{"missing fields", "/ 0 40755 2 0 0\n", DumpOptions{}, "missing RDEV"},
		{"relative path", rootLine + "a 0 100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "not absolute"},
		{"child before root", "/a 0 100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "first line must be the root"},
		{"parent missing", rootLine + "/a/b 0 100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "parent directory /a missing"},
		{"parent not dir", rootLine + "/a 0 100644 1 0 0 0 0.0 - - -\n/a/b 0 100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "parent is not a directory"},
		{"duplicate", rootLine + "/a 0 100644 1 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "already exists"},
		{"dot component", rootLine + "/. 0 100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "invalid"},
		{"bad mode", rootLine + "/a 0 100z44 1 0 0 0 0.0 - - -\n", DumpOptions{}, "MODE"},
		{"mode without type", rootLine + "/a 0 644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "no valid file type"},
		{"bad size", rootLine + "/a x 100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "SIZE"},
		{"uid too big", rootLine + "/a 0 100644 1 4294967296 0 0 0.0 - - -\n", DumpOptions{}, "UID"},
		{"bad gid", rootLine + "/a 0 100644 1 0 -1 0 0.0 - - -\n", DumpOptions{}, "GID"},
		{"mtime without dot", rootLine + "/a 0 100644 1 0 0 0 5 - - -\n", DumpOptions{}, "SEC.NSEC"},
		{"nsec too big", rootLine + "/a 0 100644 1 0 0 0 5.1000000000 - - -\n", DumpOptions{}, "nanoseconds"},
		{"content size mismatch", rootLine + "/a 3 100644 1 0 0 0 0.0 - ab -\n", DumpOptions{}, "CONTENT is 2 bytes but SIZE is 3"},
		{"content too large", rootLine + "/a 5001 100644 1 0 0 0 0.0 - " + strings.Repeat("a", 5001) + " -\n", DumpOptions{}, "more than the 5000"},
		{"bad escape", rootLine + "/a\\q 0 100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "unsupported escape"},
		{"short hex escape", rootLine + "/a\\x4 0 100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "two hex digits"},
		{"bad digest", rootLine + "/a 9 100644 1 0 0 0 0.0 - - abc\n", DumpOptions{}, "DIGEST"},
		{"symlink without target", rootLine + "/l 0 120777 1 0 0 0 0.0 - - -\n", DumpOptions{}, "symlink without a target"},
		{"symlink target too long", rootLine + "/l 4096 120777 1 0 0 0 0.0 " + strings.Repeat("t", 4096) + " - -\n", DumpOptions{}, "longer than 4095"},
		{"xattr without =", rootLine + "/a 0 100644 1 0 0 0 0.0 - - - user.x\n", DumpOptions{}, "has no '='"},
		{"empty xattr key", rootLine + "/a 0 100644 1 0 0 0 0.0 - - - =v\n", DumpOptions{}, "length must be 1..255"},
		{"xattr budget", rootLine + "/a 0 100644 1 0 0 0 0.0 - - - user.a=" + strings.Repeat("v", 20000) + " user.b=" + strings.Repeat("v", 20000) + "\n", DumpOptions{}, "exceed 32767"},
		{"hardlink dir", rootLine + "/d 0 @40755 1 0 0 0 0.0 /x - -\n", DumpOptions{}, "can't be hardlinked"},
		{"hardlink no target", rootLine + "/h 0 @100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "without a target"},
		{"hardlink missing target", rootLine + "/h 0 @100644 1 0 0 0 0.0 /nope - -\n", DumpOptions{}, "does not exist"},
		{"hardlink self", rootLine + "/h 0 @100644 1 0 0 0 0.0 /h - -\n", DumpOptions{}, "to itself"},
		{"hardlink cycle", rootLine + "/a 0 @100644 1 0 0 0 0.0 /b - -\n/b 0 @100644 1 0 0 0 0.0 /a - -\n", DumpOptions{}, "cycle"},
		{"hardlink to dir", rootLine + "/d 0 40755 2 0 0 0 0.0 - - -\n/h 0 @100644 1 0 0 0 0.0 /d - -\n", DumpOptions{}, "is a directory"},
		{"NUL byte", rootLine + "/a\x00 0 100644 1 0 0 0 0.0 - - -\n", DumpOptions{}, "NUL"},
		{"empty line", rootLine + "\n", DumpOptions{}, "missing SIZE"},
		{"strict: no newline", strings.TrimSuffix(rootLine, "\n"), DumpOptions{Strict: true}, "missing trailing newline"},
		{"strict: rdev on file", rootLine + "/a 0 100644 1 0 0 5 0.0 - - -\n", DumpOptions{Strict: true}, "non-zero RDEV"},
		{"strict: symlink size", rootLine + "/l 9 120777 1 0 0 0 0.0 x - -\n", DumpOptions{Strict: true}, "does not match"},
		{"line too long", rootLine + "/" + strings.Repeat("a", maxDumpLine) + "\n", DumpOptions{}, "longer than"},
		{"strict: 9 fields", rootLine + "/l 1 120777 1 0 0 0 0.0 x\n", DumpOptions{Strict: true}, "only 9 of 11 fields (missing CONTENT)"},
		{"strict: mode beyond 16 bits", rootLine + "/l 1 20720777 1 0 0 0 0.0 x - -\n", DumpOptions{Strict: true}, "bits beyond"},
		{"strict: bad digest on a symlink", rootLine + "/l 1 120777 1 0 0 0 0.0 x - abc\n", DumpOptions{Strict: true}, "DIGEST"},
		{"no MTIME", rootLine + "/a 0 100644 1 0 0 0\n", DumpOptions{}, "only 7 of 11 fields (missing MTIME)"},
		{"hardlink with 8 fields", rootLine + "/h 0 @100644 1 0 0 0 0.0\n", DumpOptions{}, "without a target"},
		{"empty digest on an external file", rootLine + "/a 9 100644 1 0 0 0 0.0 ab/cd -\n", DumpOptions{}, "DIGEST"},
		{"8 fields and a SIZE", rootLine + "/a 9 100644 1 0 0 0 0.0 - \n", DumpOptions{}, "CONTENT is 0 bytes but SIZE is 9"},
		{"empty symlink target", rootLine + "/l 0 120777 1 0 0 0 0.0\n", DumpOptions{}, "symlink without a target"},
		{"9 fields of an external file", rootLine + "/e 9000 100644 1 0 0 0 0.0 ab/cd\n", DumpOptions{}, "CONTENT is 0 bytes but SIZE is 9000"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseDump(strings.NewReader(tt.in), tt.opts)
			if err == nil {
				t.Fatalf("no error, want one containing %q", tt.error)
			}
			if !strings.Contains(err.Error(), tt.error) {
				t.Fatalf("error %q does not contain %q", err, tt.error)
			}
		})
	}
}

func TestParseDumpAccepts(t *testing.T) {
	in := rootLine +
		"/a\\x20b 0 100644 1 0 0 0 -5.7 - - - user.k\\x3d=v\\x00\\n user.empty=\n" +
		"/dash 1 100644 1 0 0 0 0.0 - \\x2d -\n" +
		"/ext 5000 100600 1 0 0 0 0.0 21/9c2df1dc52c12b7f666570d48b3f57c2e1ef58aa4734111f36773c8e731829 - 219C2DF1DC52C12B7F666570D48B3F57C2E1EF58AA4734111F36773C8E731829\n" +
		"/h 0 @100644 1 0 0 0 0.0 /ext - -\n" +
		"/l 1 120777 1 0 0 0 0.0 /ext - -\n" +
		"/fifo 7 10644 1 0 0 9 0.0 - - -\n" +
		"/nonl 0 100644 1 0 0 0 0.0 - - -" // no trailing newline: fine when not strict
	root, err := ParseDump(strings.NewReader(in), DumpOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ab := root.Lookup("/a b")
	if ab == nil || ab.Mtime != (Timespec{Sec: -5, Nsec: 7}) {
		t.Fatalf("/a b = %+v", ab)
	}
	if v, _ := ab.Xattr("user.k="); string(v) != "v\x00\n" {
		t.Errorf("user.k= = %q", v)
	}
	if v, ok := ab.Xattr("user.empty"); !ok || len(v) != 0 {
		t.Errorf("user.empty = %q, %v", v, ok)
	}
	if c := root.Lookup("/dash").Content; string(c) != "-" {
		t.Errorf("/dash content %q", c)
	}
	ext := root.Lookup("/ext")
	if ext.Digest == nil || ext.Digest.ObjectPath() != ext.Payload {
		t.Errorf("/ext digest %v payload %s", ext.Digest, ext.Payload)
	}
	if h := root.Lookup("/h"); h.LinkTo != ext || h.Target() != ext {
		t.Errorf("/h does not link to /ext")
	}
	if l := root.Lookup("/l"); l.Size != 4 || l.Payload != "/ext" {
		t.Errorf("symlink size %d payload %q", l.Size, l.Payload)
	}
	if f := root.Lookup("/fifo"); f.Rdev != 0 {
		t.Errorf("fifo kept rdev %d", f.Rdev)
	}
	if root.Lookup("/nonl") == nil {
		t.Error("last line without newline was dropped")
	}
}

// TestParseDumpNonStrict: without Strict, lines may stop after MTIME (the
// missing fields read as empty, as mkcomposefs reads them), mode bits above
// 16 are dropped and a DIGEST nothing uses may be malformed.
func TestParseDumpNonStrict(t *testing.T) {
	in := rootLine +
		"/l 0 20720777 1 0 0 0 0.0 " + strings.Repeat("a", 4095) + "\n" + // 9 fields, mode with high bits
		"/f 0 100644 1 0 0 0 0.0\n" + // 8 fields
		"/g 0 100644 1 0 0 0 0.0 -\n" +
		"/s 0 120777 1 0 0 0 0.0 target - \n" + // empty DIGEST on a symlink
		"/i 2 100644 1 0 0 0 0.0 - ab x\n" // malformed DIGEST on an inline file
	root, err := ParseDump(strings.NewReader(in), DumpOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l := root.Lookup("/l"); l == nil || l.Mode != ModeSymlink|0o777 || len(l.Payload) != 4095 || l.Size != 4095 {
		t.Errorf("/l = %+v", l)
	}
	for _, p := range []string{"/f", "/g"} {
		if n := root.Lookup(p); n == nil || n.Type() != ModeRegular || n.Payload != "" || n.Content != nil || n.Digest != nil {
			t.Errorf("%s = %+v", p, n)
		}
	}
	if s := root.Lookup("/s"); s == nil || s.Payload != "target" || s.Digest != nil {
		t.Errorf("/s = %+v", s)
	}
	if i := root.Lookup("/i"); i == nil || string(i.Content) != "ab" || i.Digest != nil {
		t.Errorf("/i = %+v", i)
	}
	if _, err := ParseDump(strings.NewReader(in), DumpOptions{Strict: true}); err == nil {
		t.Error("strict parsing accepted short lines")
	}
}

// TestParseDumpGolden parses every golden dumpfile in strict mode and checks
// a few facts the vectors README states.
func TestParseDumpGolden(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(goldenDir(t), "*.dump"))
	if len(files) == 0 {
		t.Fatal("no dumpfiles")
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseDump(bytes.NewReader(b), DumpOptions{Strict: true}); err != nil {
			t.Errorf("%s: %v", filepath.Base(f), err)
		}
	}
	root := parseDumpFile(t, "basic.dump")
	if n := root.Lookup("/bigdev"); n == nil || Major(n.Rdev) != 300 || Minor(n.Rdev) != 70000 {
		t.Errorf("/bigdev rdev decodes to %d:%d", Major(n.Rdev), Minor(n.Rdev))
	}
	if Makedev(300, 70000) != 286338160 || Makedev(8, 1) != 2049 {
		t.Errorf("Makedev does not match glibc")
	}
}

// FuzzParseDump feeds arbitrary dumpfiles to the parser and every tree it
// accepts to the writer: neither may panic, and the writer either writes a
// whole image or returns an error.
func FuzzParseDump(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join(goldenDir(f), "*.dump"))
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		if len(b) < 8192 {
			f.Add(b)
		}
	}
	f.Add([]byte(rootLine + "/h 0 @100644 1 0 0 0 0.0 /a - -\n/a 0 @100644 1 0 0 0 0.0 /h - -\n"))
	f.Add([]byte(rootLine + "/w 0 20000 1 0 0 0 0.0 - - - trusted.overlay.x=y\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		root, err := ParseDump(bytes.NewReader(data), DumpOptions{})
		if err != nil {
			if !errors.Is(err, ErrDumpSyntax) {
				t.Fatalf("error does not wrap ErrDumpSyntax: %v", err)
			}
			return
		}
		for _, opts := range []WriteOptions{DefaultWriteOptions(), {MinVersion: 0, MaxVersion: 0}} {
			var buf bytes.Buffer
			d, err := WriteImage(&buf, root, opts)
			if err != nil {
				continue
			}
			if buf.Len()%blkSize != 0 || VerityDigestOf(buf.Bytes()) != d {
				t.Fatalf("image of %d bytes, digest %s inconsistent", buf.Len(), d)
			}
		}
	})
}
