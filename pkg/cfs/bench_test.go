package cfs

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// benchTreeEntries is the size of the generated tree of the writer and
// reader benchmarks.
const benchTreeEntries = 50000

// makeBenchTree writes a deterministic tree of about n entries under dir:
// directories, symlinks and regular files of mixed sizes (half of them
// inline-sized), a tenth carrying user xattrs. It returns the bytes of file
// content written.
func makeBenchTree(tb testing.TB, dir string, n int) int64 {
	tb.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	dirs := []string{dir}
	var total int64
	buf := pattern(256*1024, 251)
	for i := 0; i < n; i++ {
		parent := dirs[rng.IntN(len(dirs))]
		name := filepath.Join(parent, fmt.Sprintf("e%05d", i))
		var err error
		switch r := rng.IntN(100); {
		case r < 5 && len(dirs) < n/10:
			err = os.Mkdir(name, 0o755)
			dirs = append(dirs, name)
		case r < 10:
			err = os.Symlink(fmt.Sprintf("../target-%d", i), name)
		default:
			var size int
			switch s := rng.IntN(100); {
			case s < 50:
				size = rng.IntN(65)
			case s < 95:
				size = 65 + rng.IntN(8192)
			default:
				size = 8192 + rng.IntN(64*1024)
			}
			// Vary the content so objects do not all deduplicate.
			off := rng.IntN(len(buf) - size)
			err = os.WriteFile(name, buf[off:off+size], 0o644)
			total += int64(size)
			if err == nil && rng.IntN(10) == 0 {
				err = unix.Lsetxattr(name, "user.bench", []byte(fmt.Sprintf("v%d", rng.IntN(50))), 0)
			}
		}
		if err != nil {
			tb.Fatal(err)
		}
	}
	return total
}

// BenchmarkWriter50k builds an image from a 50,000-entry directory tree
// (hashing every file, no object copies) and reports entries/s and bytes/s
// of file content; BenchmarkWriterLayout50k times the image writing alone.
func BenchmarkWriter50k(b *testing.B) {
	dir := b.TempDir()
	contentBytes := makeBenchTree(b, dir, benchTreeEntries)
	b.SetBytes(contentBytes)
	var imgSize int
	for b.Loop() {
		root, err := BuildFromDir(context.Background(), dir, DirOptions{})
		if err != nil {
			b.Fatal(err)
		}
		var buf bytes.Buffer
		if _, err := WriteImage(&buf, root, DefaultWriteOptions()); err != nil {
			b.Fatal(err)
		}
		imgSize = buf.Len()
	}
	reportRate(b, benchTreeEntries, "entries/s")
	b.ReportMetric(float64(imgSize), "image-bytes")
}

// benchTree builds the tree of the 50,000-entry directory.
func benchTree(b *testing.B) *Node {
	dir := b.TempDir()
	makeBenchTree(b, dir, benchTreeEntries)
	root, err := BuildFromDir(context.Background(), dir, DirOptions{})
	if err != nil {
		b.Fatal(err)
	}
	return root
}

func BenchmarkWriterLayout50k(b *testing.B) {
	root := benchTree(b)
	var buf bytes.Buffer
	for b.Loop() {
		buf.Reset()
		if _, err := WriteImage(&buf, root, DefaultWriteOptions()); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(buf.Len()))
	reportRate(b, benchTreeEntries, "entries/s")
}

// BenchmarkReader50k opens and walks the image of the 50,000-entry tree and
// lists its objects; bytes/s counts image bytes.
func BenchmarkReader50k(b *testing.B) {
	var buf bytes.Buffer
	if _, err := WriteImage(&buf, benchTree(b), DefaultWriteOptions()); err != nil {
		b.Fatal(err)
	}
	img := buf.Bytes()
	b.SetBytes(int64(len(img)))
	for b.Loop() {
		im, err := Open(bytes.NewReader(img), int64(len(img)), OpenOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if len(im.Objects()) == 0 || im.Root() == nil {
			b.Fatal("empty image")
		}
	}
	reportRate(b, benchTreeEntries, "entries/s")
}

func reportRate(b *testing.B, entries int, unit string) {
	perOp := b.Elapsed() / time.Duration(b.N)
	b.ReportMetric(float64(entries)/perOp.Seconds(), unit)
}
