package cfs

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// goldenImage is one .cfs vector and how it was made.
type goldenImage struct {
	name    string // file name without .cfs
	base    string // vector name without a .vN suffix
	opts    WriteOptions
	fromDir bool // built by mkcomposefs from a directory, not a dumpfile
}

// goldenImages lists every .cfs in the golden folder, so that new vectors
// are picked up without changing the tests.
func goldenImages(t testing.TB) []goldenImage {
	t.Helper()
	dir := goldenDir(t)
	files, err := filepath.Glob(filepath.Join(dir, "*.cfs"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden images in %s: %v", dir, err)
	}
	var out []goldenImage
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".cfs")
		g := goldenImage{name: name, base: name, opts: DefaultWriteOptions()}
		if i := strings.LastIndex(name, ".v"); i > 0 {
			var v int
			if _, err := fmt.Sscanf(name[i+2:], "%d", &v); err == nil {
				g.base = name[:i]
				g.opts = WriteOptions{MinVersion: v, MaxVersion: v}
			}
		}
		if _, err := os.Stat(filepath.Join(dir, g.base+".dump")); err != nil {
			g.fromDir = true
		}
		out = append(out, g)
	}
	return out
}

func readGolden(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(goldenDir(t), name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func parseDumpFile(t testing.TB, name string) *Node {
	t.Helper()
	root, err := ParseDump(bytes.NewReader(readGolden(t, name)), DumpOptions{Strict: true})
	if err != nil {
		t.Fatalf("parse %s: %v", name, err)
	}
	return root
}

// firstDiff describes where two byte slices start to differ.
func firstDiff(got, want []byte) string {
	n := min(len(got), len(want))
	for i := 0; i < n; i++ {
		if got[i] != want[i] {
			return fmt.Sprintf("first difference at byte %d (%#x): got %#02x, want %#02x (sizes %d, %d)", i, i, got[i], want[i], len(got), len(want))
		}
	}
	return fmt.Sprintf("sizes differ: got %d, want %d", len(got), len(want))
}

func TestWriterGoldenFromDump(t *testing.T) {
	for _, g := range goldenImages(t) {
		t.Run(g.name, func(t *testing.T) {
			src := g.base + ".dump"
			if g.fromDir {
				// mkcomposefs --from-file NAME.info.dump reproduces a directory-built image (vectors README).
				src = g.name + ".info.dump"
			}
			root := parseDumpFile(t, src)
			var buf bytes.Buffer
			d, err := WriteImage(&buf, root, g.opts)
			if err != nil {
				t.Fatalf("WriteImage: %v", err)
			}
			want := readGolden(t, g.name+".cfs")
			if !bytes.Equal(buf.Bytes(), want) {
				t.Errorf("image differs from %s.cfs: %s", g.name, firstDiff(buf.Bytes(), want))
			}
			wantDigest := strings.TrimSpace(string(readGolden(t, g.name+".digest")))
			if d.String() != wantDigest {
				t.Errorf("digest = %s, want %s", d, wantDigest)
			}
			if got := VerityDigestOf(want).String(); got != wantDigest {
				t.Errorf("fs-verity of the golden image = %s, want %s", got, wantDigest)
			}
		})
	}
}
