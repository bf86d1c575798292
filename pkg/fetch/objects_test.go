package fetch

import (
	"io"
	"testing"
	"time"
)

// lenReader records the size of the buffer each read is given (its
// capacity: a read is given no more than the bytes still wanted).
type lenReader struct {
	framed bool
	got    int
}

func (r *lenReader) Read(p []byte) (int, error) { r.got = cap(p); return 0, io.EOF }
func (r *lenReader) framedReads() bool          { return r.framed }

// copyBody reads HTTP/1.1 bodies of objects over 16 KiB with the large
// buffer, and small objects and HTTP/2 bodies (framed reads, through the
// stall meter too) with the small one.
func TestCopyBufferChoice(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions())
	for _, c := range []struct {
		framed bool
		limit  int64
		want   int
	}{
		{false, 1 << 20, copyBufferSize},
		{true, 1 << 20, smallCopyBufferSize},
		{false, smallCopyBufferSize + 1, smallCopyBufferSize}, // a 16 KiB object
		{false, smallCopyBufferSize + 2, copyBufferSize},
		{false, 100, smallCopyBufferSize},
	} {
		r := &lenReader{framed: c.framed}
		if _, err := s.copyBody(io.Discard, meterReader{r, newRateMeter(time.Now(), time.Second, 0)}, c.limit); err != nil {
			t.Fatal(err)
		}
		if r.got != c.want {
			t.Errorf("framed %v, limit %d: read into a buffer of %d bytes, want %d", c.framed, c.limit, r.got, c.want)
		}
	}
}
