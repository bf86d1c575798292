package cfs

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// goldenDir is the folder of golden vectors made by the C mkcomposefs.
func goldenDir(t testing.TB) string {
	t.Helper()
	for _, d := range []string{"../../testdata/composefs", "../../../shared/testdata/composefs"} {
		if _, err := os.Stat(filepath.Join(d, "fsverity-vectors.txt")); err == nil {
			return d
		}
	}
	t.Fatal("golden vectors not found: expected testdata/composefs in the repository")
	return ""
}

func pattern(n int, mod int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i % mod)
	}
	return b
}

// vectorInput decodes the input column of fsverity-vectors.txt.
func vectorInput(t *testing.T, spec string, length int) []byte {
	t.Helper()
	switch {
	case strings.HasPrefix(spec, "pat("):
		return pattern(length, 251)
	case strings.HasPrefix(spec, "zero("):
		return make([]byte, length)
	case strings.HasPrefix(spec, `"`):
		s, err := strconv.Unquote(spec)
		if err != nil {
			t.Fatalf("bad literal %s: %v", spec, err)
		}
		return []byte(s)
	}
	t.Fatalf("unknown input generator %q", spec)
	return nil
}

func TestVerityVectors(t *testing.T) {
	f, err := os.Open(filepath.Join(goldenDir(t), "fsverity-vectors.txt"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		cols := strings.Split(line, "|")
		if len(cols) != 5 {
			t.Fatalf("bad vector line %q", line)
		}
		for i := range cols {
			cols[i] = strings.TrimSpace(cols[i])
		}
		length, err := strconv.Atoi(cols[2])
		if err != nil {
			t.Fatal(err)
		}
		data := vectorInput(t, cols[1], length)
		if len(data) != length {
			t.Fatalf("%s: generated %d bytes, want %d", cols[0], len(data), length)
		}
		n++
		t.Run(cols[0], func(t *testing.T) {
			h := NewVerityHash()
			h.Write(data)
			if got := hex.EncodeToString(func() []byte { r := h.rootHash(); return r[:] }()); got != cols[3] {
				t.Errorf("root hash = %s, want %s", got, cols[3])
			}
			if got := h.Digest().String(); got != cols[4] {
				t.Errorf("digest = %s, want %s", got, cols[4])
			}
			// The same bytes written in odd-sized pieces give the same digest.
			for _, step := range []int{1, 31, 4095, 4097, 65536} {
				if step == 1 && len(data) > 1<<20 {
					continue
				}
				h2 := NewVerityHash()
				for off := 0; off < len(data); off += step {
					h2.Write(data[off:min(off+step, len(data))])
				}
				if got := h2.Digest().String(); got != cols[4] {
					t.Errorf("written in %d-byte pieces: digest = %s, want %s", step, got, cols[4])
				}
			}
		})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if n < 10 {
		t.Fatalf("only %d vectors read", n)
	}
}

// referenceVerity is the level-by-level algorithm of the format doc, kept
// deliberately naive to cross-check the streaming hasher.
func referenceVerity(data []byte) Digest {
	var root [32]byte
	if len(data) > 0 {
		level := data
		for {
			var next []byte
			for off := 0; off < len(level); off += VerityBlockSize {
				var blk [VerityBlockSize]byte
				copy(blk[:], level[off:min(off+VerityBlockSize, len(level))])
				h := sha256.Sum256(blk[:])
				next = append(next, h[:]...)
			}
			if len(next) == 32 {
				copy(root[:], next)
				break
			}
			level = next
		}
	}
	var desc [256]byte
	desc[0], desc[1], desc[2] = 1, 1, 12
	for i := 0; i < 8; i++ {
		desc[8+i] = byte(uint64(len(data)) >> (8 * i))
	}
	copy(desc[16:], root[:])
	return sha256.Sum256(desc[:])
}

func TestVerityMatchesReferenceAtLevelBoundaries(t *testing.T) {
	// 128 hashes fill one block: sizes around 128 and 128*128 blocks change the tree depth.
	sizes := []int{1, 4095, 4096, 4097, 127 * 4096, 128 * 4096, 128*4096 + 1, 129 * 4096,
		128 * 128 * 4096, 128*128*4096 + 1}
	data := pattern(128*128*4096+1, 253)
	for _, n := range sizes {
		want := referenceVerity(data[:n])
		h := NewVerityHash()
		h.Write(data[:n])
		if got := h.Digest(); got != want {
			t.Errorf("size %d: digest %s, want %s", n, got, want)
		}
	}
}

func TestVeritySumMidStreamDoesNotDisturbState(t *testing.T) {
	data := pattern(3*4096*130+17, 251)
	h := NewVerityHash()
	h.Write(data[:200000])
	_ = h.Sum(nil)
	h.Write(data[200000:])
	if got, want := h.Digest(), referenceVerity(data); got != want {
		t.Fatalf("digest after mid-stream Sum = %s, want %s", got, want)
	}
	h.Reset()
	h.Write([]byte("a"))
	if got := h.Digest().String(); got != "bce75948b9e7510293f8f2720412af9697c1479281323f3f220623fb8e94b557" {
		t.Fatalf("after Reset: %s", got)
	}
}

func TestParseDigestAndObjectPath(t *testing.T) {
	const hexd = "13e9b8848ae484a36acb3f3cac0ceb2f7601e96633d15c92f9bd3dd44e492157"
	tests := []struct {
		in      string
		path    bool
		wantErr bool
	}{
		{hexd, false, false},
		{strings.ToUpper(hexd), false, false},
		{hexd[:63], false, true},
		{hexd + "0", false, true},
		{"zz" + hexd[2:], false, true},
		{hexd[:2] + "/" + hexd[2:], true, false},
		{hexd[:2] + "/" + strings.ToUpper(hexd[2:]), true, true},
		{hexd[:3] + "/" + hexd[3:], true, true},
		{"/" + hexd[:2] + "/" + hexd[2:], true, true},
	}
	for _, tt := range tests {
		var d Digest
		var err error
		if tt.path {
			d, err = ParseObjectPath(tt.in)
		} else {
			d, err = ParseDigest(tt.in)
		}
		if (err != nil) != tt.wantErr {
			t.Errorf("parse %q: err = %v, wantErr %v", tt.in, err, tt.wantErr)
			continue
		}
		if err == nil && d.String() != hexd {
			t.Errorf("parse %q = %s", tt.in, d)
		}
		if err == nil && d.ObjectPath() != hexd[:2]+"/"+hexd[2:] {
			t.Errorf("ObjectPath = %s", d.ObjectPath())
		}
	}
}

var benchSink Digest

func benchData() []byte { return pattern(16<<20, 251) }

func BenchmarkSHA256(b *testing.B) {
	data := benchData()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		benchSink = sha256.Sum256(data)
	}
}

func BenchmarkVerity(b *testing.B) {
	data := benchData()
	b.SetBytes(int64(len(data)))
	h := NewVerityHash()
	for b.Loop() {
		h.Reset()
		h.Write(data)
		benchSink = h.Digest()
	}
}

// BenchmarkVerityVsSHA256 hashes the same bytes with plain SHA-256 and with
// the fs-verity hasher, alternating within one run, and reports the ratio of
// fs-verity throughput to SHA-256 throughput (target: >= 0.9).
func BenchmarkVerityVsSHA256(b *testing.B) {
	data := benchData()
	h := NewVerityHash()
	var shaDur, verDur time.Duration
	for b.Loop() {
		t0 := time.Now()
		benchSink = sha256.Sum256(data)
		t1 := time.Now()
		h.Reset()
		h.Write(data)
		benchSink = h.Digest()
		verDur += time.Since(t1)
		shaDur += t1.Sub(t0)
	}
	ratio := shaDur.Seconds() / verDur.Seconds()
	b.ReportMetric(ratio, "verity/sha256")
	b.ReportMetric(0, "ns/op")
	fmt.Fprintf(os.Stderr, "fs-verity throughput = %.3f x crypto/sha256 (%.0f MB/s vs %.0f MB/s over %d rounds)\n",
		ratio, float64(b.N)*float64(len(data))/verDur.Seconds()/1e6, float64(b.N)*float64(len(data))/shaDur.Seconds()/1e6, b.N)
}

// One hasher reused (Reset) across sizes that need more and fewer tree
// levels than the last gives every digest right (the fetcher pools them).
func TestVerityHashReusedAcrossSizes(t *testing.T) {
	h := NewVerityHash()
	for _, n := range []int{3 << 20, 1, 4096, 0, 600 << 10, 4097, 128 * 4096, 128*4096 + 1, 5000, 2 << 20, 17} {
		data := pattern(n, 251)
		h.Reset()
		h.Write(data[:n/3])
		h.Write(data[n/3:])
		if got, want := h.Digest(), referenceVerity(data); got != want {
			t.Errorf("size %d after reuse: %s, want %s", n, got, want)
		}
	}
}
