package cfs

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

func checkCanonicalBytes(b []byte, opts OpenOptions) error {
	img, err := Open(bytes.NewReader(b), int64(len(b)), opts)
	if err != nil {
		return err
	}
	return CheckCanonical(img, bytes.NewReader(b), int64(len(b)))
}

// TestCanonicalGoldenVectors: every image of mkcomposefs 1.0.8 in the
// golden folder is canonical (composefs-rs V1 writes mkcomposefs
// --min-version=1's bytes: the .v1 vectors), and so is every image the
// project's writer makes of the golden dumpfiles.
func TestCanonicalGoldenVectors(t *testing.T) {
	for _, g := range goldenImages(t) {
		t.Run(g.name, func(t *testing.T) {
			b := readGolden(t, g.name+".cfs")
			// inline-tail has redirects that are not object paths: the
			// store refuses it, but the check itself must pass.
			if err := checkCanonicalBytes(b, rdLenient); err != nil {
				t.Errorf("mkcomposefs's image: %v", err)
			}
			if g.fromDir {
				return
			}
			var out bytes.Buffer
			if _, err := WriteImage(&out, parseDumpFile(t, g.base+".dump"), g.opts); err != nil {
				t.Fatal(err)
			}
			if err := checkCanonicalBytes(out.Bytes(), rdLenient); err != nil {
				t.Errorf("the writer's image: %v", err)
			}
		})
	}
}

// TestCanonicalRefusesUnusedBytes: every one-byte change of a golden image
// that the reader does not notice (the tree it gives is the same: padding,
// reserved fields, unused space) is refused by the canonical check, and so
// are trailing bytes after the image.
func TestCanonicalRefusesUnusedBytes(t *testing.T) {
	for i, name := range []string{"minimal", "hardlink-whiteout"} {
		t.Run(name, func(t *testing.T) {
			orig := readGolden(t, name+".cfs")
			want := dumpOf(t, orig)
			unnoticed := 0
			b := append([]byte(nil), orig...)
			// Every byte of the header and the superblock, and a seeded
			// sample of the rest (all of them take minutes).
			offs := make([]int, 0, 600+1152)
			for off := range min(1152, len(b)) {
				offs = append(offs, off)
			}
			rng := rand.New(rand.NewPCG(uint64(i), 7))
			for range 600 {
				offs = append(offs, 1152+rng.IntN(len(b)-1152))
			}
			for _, off := range offs {
				b[off] ^= 0x5a
				if img, err := Open(bytes.NewReader(b), int64(len(b)), OpenOptions{}); err == nil && dumpOfImage(t, img) == want {
					unnoticed++
					err := CheckCanonical(img, bytes.NewReader(b), int64(len(b)))
					if !errors.Is(err, ErrNotCanonical) {
						t.Fatalf("byte %d changed, unnoticed by the reader: CheckCanonical = %v, want ErrNotCanonical", off, err)
					}
					if unnoticed == 1 {
						t.Logf("e.g. byte %d: %v", off, err)
					}
				}
				b[off] = orig[off]
			}
			if unnoticed == 0 {
				t.Fatal("no one-byte change went unnoticed by the reader: the test checks nothing")
			}
			t.Logf("%d of %d one-byte changes (of the image's %d bytes) unnoticed by the reader, all refused", unnoticed, len(offs), len(b))
			for _, tail := range [][]byte{{0}, make([]byte, 4096)} {
				long := append(append([]byte(nil), orig...), tail...)
				if err := checkCanonicalBytes(long, OpenOptions{}); !errors.Is(err, ErrNotCanonical) {
					t.Errorf("%d trailing bytes: %v, want ErrNotCanonical", len(tail), err)
				}
			}
		})
	}
}

// TestCanonicalHardlinkPrimaries: the writer places a hardlinked inode
// where its primary path comes; images whose primaries are not the
// reader's (the first path in depth-first order) are still canonical, and
// the image's tree is left as it was.
func TestCanonicalHardlinkPrimaries(t *testing.T) {
	dump := `/ 0 40755 4 0 0 0 0.0 - - -
/a 0 40755 2 0 0 0 0.0 - - -
/a/x 5000 @100644 4 0 0 0 0.0 /z/p - -
/b 5000 @100644 4 0 0 0 0.0 /z/p - -
/m 3 100644 2 0 0 0 0.0 - abc -
/n 3 @100644 2 0 0 0 0.0 /m - -
/z 0 40755 2 0 0 0 0.0 - - -
/z/p 5000 100644 4 0 0 0 0.0 ab/cdef00000000000000000000000000000000000000000000000000000000000 - -
/z/q 5000 @100644 4 0 0 0 0.0 /z/p - -
`
	root, err := ParseDump(strings.NewReader(dump), DumpOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if _, err := WriteImage(&out, root, DefaultWriteOptions()); err != nil {
		t.Fatal(err)
	}
	b := out.Bytes()
	img, err := Open(bytes.NewReader(b), int64(len(b)), rdLenient)
	if err != nil {
		t.Fatal(err)
	}
	before := dumpOfImage(t, img)
	if err := CheckCanonical(img, bytes.NewReader(b), int64(len(b))); err != nil {
		t.Fatal(err)
	}
	if after := dumpOfImage(t, img); after != before {
		t.Errorf("CheckCanonical changed the image's tree:\n%s\nwas\n%s", after, before)
	}
}

func dumpOf(t *testing.T, b []byte) string {
	t.Helper()
	img, err := Open(bytes.NewReader(b), int64(len(b)), OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return dumpOfImage(t, img)
}

func dumpOfImage(t *testing.T, img *Image) string {
	t.Helper()
	var d bytes.Buffer
	if err := WriteDump(&d, img.Root()); err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// FuzzCheckCanonical: the check never panics on an image the reader
// accepts, and whatever it accepts is exactly the writer's image of the
// reader's tree.
func FuzzCheckCanonical(f *testing.F) {
	for _, g := range goldenImages(f) {
		f.Add(readGolden(f, g.name+".cfs"))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		img, err := Open(bytes.NewReader(b), int64(len(b)), OpenOptions{MaxInodes: 10000})
		if err != nil {
			return
		}
		before := dumpOfImage(t, img)
		err = CheckCanonical(img, bytes.NewReader(b), int64(len(b)))
		if err != nil && !errors.Is(err, ErrNotCanonical) {
			t.Fatalf("CheckCanonical: %v, not ErrNotCanonical", err)
		}
		if after := dumpOfImage(t, img); after != before {
			t.Fatal("CheckCanonical changed the image's tree")
		}
		if err == nil {
			root, _ := writerInput(img, int(img.Version()))
			var out bytes.Buffer
			v := int(img.Version())
			if _, werr := WriteImage(&out, root, WriteOptions{MinVersion: v, MaxVersion: v}); werr != nil || !bytes.Equal(out.Bytes(), b) {
				t.Fatalf("accepted an image that is not the writer's (%v)", werr)
			}
		}
	})
}

// BenchmarkCanonical50k measures what the canonical check adds to parsing
// a 50,000-entry image: each round opens the image (what the store does
// anyway) and, alternately, opens and checks it; it prints the ratio of
// their medians (canonical/parse).
func BenchmarkCanonical50k(b *testing.B) {
	var buf bytes.Buffer
	if _, err := WriteImage(&buf, benchTree(b), DefaultWriteOptions()); err != nil {
		b.Fatal(err)
	}
	img := buf.Bytes()
	parse := func() *Image {
		im, err := Open(bytes.NewReader(img), int64(len(img)), OpenOptions{})
		if err != nil {
			b.Fatal(err)
		}
		return im
	}
	var plain, checked []time.Duration
	for b.Loop() {
		t0 := time.Now()
		parse()
		t1 := time.Now()
		if err := CheckCanonical(parse(), bytes.NewReader(img), int64(len(img))); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		plain = append(plain, t1.Sub(t0))
		checked = append(checked, t2.Sub(t1))
	}
	b.SetBytes(int64(len(img)))
	mp, mc := median(plain), median(checked)
	b.ReportMetric(float64(mc)/float64(mp), "canonical/parse")
	b.ReportMetric(mp.Seconds()*1e3, "parse-ms")
	b.ReportMetric(mc.Seconds()*1e3, "parse+check-ms")
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
	return s[len(s)/2]
}
