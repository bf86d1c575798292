package cfs

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
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

// TestWriterDeterministic builds the same tree created in two different
// orders (so directories list their entries differently) with different
// thread counts, and expects identical images.
func TestWriterDeterministic(t *testing.T) {
	names := []string{"zeta", "alpha", "mid", "b-file", "a.dir", "Ω", "-dash", "9"}
	build := func(order []string, threads int) []byte {
		dir := t.TempDir()
		for _, n := range order {
			p := filepath.Join(dir, n)
			if strings.HasSuffix(n, ".dir") {
				if err := os.Mkdir(p, 0o755); err != nil {
					t.Fatal(err)
				}
				for _, c := range order {
					if err := os.WriteFile(filepath.Join(p, c), pattern(100+len(c)*1000, 251), 0o600); err != nil {
						t.Fatal(err)
					}
				}
			} else if err := os.WriteFile(p, pattern(len(n)*37, 253), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		// Same mtimes everywhere, whatever the creation order.
		filepath.Walk(dir, func(p string, _ os.FileInfo, _ error) error {
			return os.Chtimes(p, time.Unix(1700000000, 5), time.Unix(1700000000, 5))
		})
		root, err := BuildFromDir(context.Background(), dir, DirOptions{Threads: threads})
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if _, err := WriteImage(&buf, root, DefaultWriteOptions()); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	reversed := append([]string(nil), names...)
	slices.Reverse(reversed)
	a, b := build(names, 1), build(reversed, 4)
	if !bytes.Equal(a, b) {
		t.Fatalf("images differ with creation order and threads: %s", firstDiff(a, b))
	}
}

// TestWriterRefusesInvalidTrees checks the writer's own validation of trees
// that do not come from the dumpfile parser.
func TestWriterRefusesInvalidTrees(t *testing.T) {
	dir := func(children ...*Node) *Node {
		r := &Node{Mode: ModeDir | 0o755}
		r.Children = children
		for _, c := range children {
			c.Parent = r
		}
		return r
	}
	file := &Node{Name: "f", Mode: ModeRegular | 0o644}
	tests := []struct {
		name string
		root *Node
		opts WriteOptions
		msg  string
	}{
		{"root not dir", &Node{Mode: ModeRegular}, DefaultWriteOptions(), "root must be a directory"},
		{"bad version", dir(), WriteOptions{MinVersion: 2, MaxVersion: 2}, "format versions"},
		{"empty symlink", dir(&Node{Name: "l", Mode: ModeSymlink | 0o777}), DefaultWriteOptions(), "symlink target"},
		{"unsorted", dir(&Node{Name: "b", Mode: ModeFIFO}, &Node{Name: "a", Mode: ModeFIFO}), DefaultWriteOptions(), "not sorted"},
		{"bad name", dir(&Node{Name: "a/b", Mode: ModeFIFO}), DefaultWriteOptions(), "contains '/'"},
		{"link outside", dir(&Node{Name: "h", Mode: ModeRegular, LinkTo: file}), DefaultWriteOptions(), "not in the tree"},
		{"huge file", dir(&Node{Name: "x", Mode: ModeRegular | 0o644, Size: 1 << 62}), DefaultWriteOptions(), "too large"},
		{"bad mode", dir(&Node{Name: "x", Mode: 0o644}), DefaultWriteOptions(), "no valid file type"},
	}
	for _, tt := range tests {
		_, err := WriteImage(io.Discard, tt.root, tt.opts)
		if err == nil || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("%s: error %v, want %q", tt.name, err, tt.msg)
		}
	}
}

// TestWriterRefusesMoreInvalidTrees: trees built in code, not parsed.
func TestWriterRefusesMoreInvalidTrees(t *testing.T) {
	f := &Node{Name: "f", Mode: ModeRegular | 0o644}
	orphanAlias := &Node{Mode: ModeDir | 0o755, Children: []*Node{f, {Name: "g", Mode: ModeRegular, LinkTo: f}}}
	f.Parent = orphanAlias // the alias has no Parent set
	var buf bytes.Buffer
	if _, err := WriteImage(&buf, orphanAlias, DefaultWriteOptions()); err != nil {
		t.Errorf("alias without Parent: %v", err)
	}
	root := func(c *Node) *Node {
		r := &Node{Mode: ModeDir | 0o755}
		if err := r.AddChild(c); err != nil {
			t.Fatal(err)
		}
		return r
	}
	for name, tree := range map[string]*Node{
		"NUL in symlink target": root(&Node{Name: "l", Mode: ModeSymlink | 0o777, Payload: "abc\x00def"}),
		"NUL in payload":        root(&Node{Name: "x", Mode: ModeRegular | 0o644, Size: 9000, Payload: "ab/c\x00d"}),
		"1025 chunks":           root(&Node{Name: "x", Mode: ModeRegular | 0o644, Size: 1<<53 + 1, Payload: "ab/cd"}),
	} {
		if _, err := WriteImage(io.Discard, tree, DefaultWriteOptions()); !errors.Is(err, ErrInvalidTree) {
			t.Errorf("%s: %v, want ErrInvalidTree", name, err)
		}
	}
}

// TestWriterChunkMapBeyondInode: a file so large (1024 chunks of 8 TiB) that
// its chunk map cannot sit beside its inode is written as mkcomposefs writes
// it: the inode starts a block, its layout stays chunk-based with no inline
// map, and a data block of 1024 holes follows the other data.
func TestWriterChunkMapBeyondInode(t *testing.T) {
	r := &Node{Mode: ModeDir | 0o755}
	big := &Node{Name: "big", Mode: ModeRegular | 0o777, Nlink: 1, Size: 9001899274941000}
	big.Xattrs = []Xattr{{Key: "user.foo"}} // xattrs that leave no room for a 4096-byte map
	if err := r.AddChild(big); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := WriteImage(&buf, r, DefaultWriteOptions()); err != nil {
		t.Fatal(err)
	}
	img := buf.Bytes()
	le := binary.LittleEndian
	blocks := le.Uint32(img[superOffset+36:])
	if int(blocks)*blkSize != len(img) {
		t.Fatalf("superblock says %d blocks, image has %d bytes", blocks, len(img))
	}
	last := img[len(img)-blkSize:]
	if !bytes.Equal(last, bytes.Repeat([]byte{0xff}, blkSize)) {
		t.Errorf("last block is not 1024 holes: % x…", last[:16])
	}
	found := false
	for off := inodesStart; off+extendedSize <= len(img); off += slotSize {
		if le.Uint16(img[off:]) == layoutChunkBased<<1|1 && le.Uint64(img[off+8:]) == big.Size {
			found = true
			if off%blkSize != 0 {
				t.Errorf("inode at %d, not at a block start", off)
			}
			if iu := le.Uint32(img[off+16:]); iu != 43-blkBits {
				t.Errorf("i_u %#x, want chunk format %d", iu, 43-blkBits)
			}
		}
	}
	if !found {
		t.Fatal("no extended chunk-based inode of the file's size")
	}
}
