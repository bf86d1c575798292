package cfs

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/internal/heaptest"
)

// memoryShape builds the image of a tree of n entries of one kind, in
// directories of 1,000: "empty" files with their own mtimes, "compact"
// ones (short names, compact inodes: the fewest image bytes per inode),
// "hardlink"s to one file (an entry without an inode), "external" files
// backed by objects, "symlink"s, files with 4 "xattrs" of their own, or
// with the same 8 xattrs ("shared": one copy in the image).
func memoryShape(tb testing.TB, kind string, n int) []byte {
	tb.Helper()
	root := &Node{Mode: ModeDir | 0o755, Nlink: 2}
	dirs := max(n/1000, 1)
	for i := range dirs {
		dir := &Node{Name: fmt.Sprintf("d%04d", i), Mode: ModeDir | 0o755, Nlink: 2}
		if err := root.AddChild(dir); err != nil {
			tb.Fatal(err)
		}
		for j := range n / dirs {
			f := &Node{Name: fmt.Sprintf("f%05d", j), Mode: ModeRegular | 0o644, Nlink: 1, Mtime: Timespec{Sec: int64(j)}}
			switch kind {
			case "compact":
				f.Mtime, f.Name = Timespec{}, fmt.Sprintf("%x", j)
			case "hardlink":
				if j > 0 {
					f = &Node{Name: fmt.Sprintf("%x", j), LinkTo: dir.Children[0]}
					dir.Children[0].Nlink++
				}
			case "external":
				dg := Digest(sha256.Sum256([]byte(fmt.Sprint(i, j))))
				f.Size, f.Payload, f.Digest = 4096, dg.ObjectPath(), &dg
			case "symlink":
				f.Mode, f.Payload = ModeSymlink|0o777, strings.Repeat("t", 60)
			case "xattrs":
				for k := range 4 {
					f.Xattrs = append(f.Xattrs, Xattr{Key: fmt.Sprintf("user.k%d", k), Value: fmt.Appendf(nil, "%d-%d", j, k)})
				}
			case "shared":
				for k := range 8 {
					f.Xattrs = append(f.Xattrs, Xattr{Key: fmt.Sprintf("user.%d", k), Value: bytes.Repeat([]byte{'v'}, 200)})
				}
			}
			if err := dir.AddChild(f); err != nil {
				tb.Fatal(err)
			}
		}
	}
	var buf bytes.Buffer
	if _, err := WriteImage(&buf, root, DefaultWriteOptions()); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

var memoryShapes = []string{"empty", "compact", "hardlink", "external", "symlink", "xattrs", "shared"}

// BenchmarkCanonicalMemory measures, for images of 200,000 entries of each
// shape, the peak live heap of parsing (Open) and of parsing and checking
// canonical, per byte of image and per entry:
//
//	go test -run '^$' -bench CanonicalMemory -benchtime 1x ./pkg/cfs
func BenchmarkCanonicalMemory(b *testing.B) {
	const n = 200000
	for _, kind := range memoryShapes {
		b.Run(kind, func(b *testing.B) {
			img := memoryShape(b, kind, n)
			var parse, check, est int64
			for b.Loop() {
				var im *Image
				parse = heaptest.PeakLive(func() {
					var err error
					if im, err = Open(bytes.NewReader(img), int64(len(img)), OpenOptions{}); err != nil {
						b.Fatal(err)
					}
				})
				check = heaptest.PeakLive(func() {
					im, err := Open(bytes.NewReader(img), int64(len(img)), OpenOptions{})
					if err != nil {
						b.Fatal(err)
					}
					if err := CheckCanonical(im, bytes.NewReader(img), int64(len(img))); err != nil {
						b.Fatal(err)
					}
				})
				est = im.Stats().Memory
				runtime.KeepAlive(im)
			}
			b.ReportMetric(float64(len(img)), "image-B")
			b.ReportMetric(float64(parse)/float64(len(img)), "parse-B/B")
			b.ReportMetric(float64(check)/float64(len(img)), "check-B/B")
			b.ReportMetric(float64(parse)/n, "parse-B/entry")
			b.ReportMetric(float64(check)/n, "check-B/entry")
			b.ReportMetric(float64(est)/float64(check), "estimate/peak")
		})
	}
}

// TestMemoryEstimate: the memory estimate of an image (ImageStats.Memory,
// what OpenOptions.MaxMemory bounds) covers the peak live heap of Open and
// CheckCanonical for images of every shape; the printed ratios show how
// conservative it is.
func TestMemoryEstimate(t *testing.T) {
	if testing.Short() {
		t.Skip("parses images of 10,000 entries")
	}
	const n = 10000
	for _, kind := range memoryShapes {
		img := memoryShape(t, kind, n)
		var est int64
		peak := heaptest.PeakLive(func() {
			im, err := Open(bytes.NewReader(img), int64(len(img)), OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := CheckCanonical(im, bytes.NewReader(img), int64(len(img))); err != nil {
				t.Fatal(err)
			}
			est = im.Stats().Memory
		})
		t.Logf("%d %s entries (%d KiB image): estimate %.1f MiB, peak live heap %.1f MiB (ratio %.2f)",
			n, kind, len(img)>>10, float64(est)/(1<<20), float64(peak)/(1<<20), float64(est)/float64(peak))
		if est < peak {
			t.Errorf("%s: the estimate %d is below the %d bytes Open and CheckCanonical took", kind, est, peak)
		}
	}
}

// TestMaxMemory: an image whose tree needs more than
// OpenOptions.MaxMemory is refused with ErrTooLarge once the walk reaches
// the limit, without building the rest: the peak live heap stays near the
// limit, not near what the whole tree takes (hard links: 20 bytes per
// byte of image).
func TestMaxMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("parses an image of 100,000 entries")
	}
	img := memoryShape(t, "hardlink", 100000)
	full, err := Open(bytes.NewReader(img), int64(len(img)), OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	need := full.Stats().Memory
	full = nil
	limit := need / 8
	var oerr error
	peak := heaptest.PeakLive(func() {
		_, oerr = Open(bytes.NewReader(img), int64(len(img)), OpenOptions{MaxMemory: limit})
	})
	t.Logf("tree estimate %.1f MiB, limit %.1f MiB: %v; peak live heap %.1f MiB", float64(need)/(1<<20), float64(limit)/(1<<20), oerr, float64(peak)/(1<<20))
	if !errors.Is(oerr, ErrTooLarge) {
		t.Fatalf("Open with MaxMemory %d of %d: %v, want ErrTooLarge", limit, need, oerr)
	}
	if peak > limit {
		t.Errorf("refusing the image took %d bytes of heap, more than the limit of %d", peak, limit)
	}
	// At the limit exactly, the image is accepted.
	if _, err := Open(bytes.NewReader(img), int64(len(img)), OpenOptions{MaxMemory: need}); err != nil {
		t.Errorf("Open with MaxMemory at the estimate: %v", err)
	}
}
