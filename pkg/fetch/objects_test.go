package fetch

import (
	"io"
	"testing"
	"time"
)

// lenReader records the size of the buffer each read is given (its
// capacity: a read is given no more than the bytes still wanted).
type lenReader struct{ got int }

func (r *lenReader) Read(p []byte) (int, error) { r.got = cap(p); return 0, io.EOF }

// copyBody reads objects over 16 KiB with the large buffer, the others
// with the small one.
func TestCopyBufferChoice(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions())
	for _, c := range []struct {
		limit int64 // one more than the object's size
		want  int
	}{
		{1 << 20, copyBufferSize},
		{smallCopyBufferSize + 1, smallCopyBufferSize}, // a 16 KiB object
		{smallCopyBufferSize + 2, copyBufferSize},
		{100, smallCopyBufferSize},
	} {
		r := &lenReader{}
		if _, err := s.copyBody(io.Discard, meterReader{r, newRateMeter(time.Now(), time.Second, 0)}, c.limit); err != nil {
			t.Fatal(err)
		}
		if r.got != c.want {
			t.Errorf("limit %d: read into a buffer of %d bytes, want %d", c.limit, r.got, c.want)
		}
	}
}
