package pack

import (
	"bytes"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// FuzzDecodeIndex: any bytes decode or fail cleanly, and what decodes
// encodes back to the same bytes (one index, one encoding).
func FuzzDecodeIndex(f *testing.F) {
	var d1, d2 cfs.Digest
	d1[0], d2[0] = 1, 2
	good, _ := EncodeIndex(Index{Packs: 2, Entries: []Entry{{Digest: d1, Size: 100, Pack: 0, Offset: 1024}, {Digest: d2, Size: 1 << 20, Pack: 1, Offset: 512}}})
	f.Add(good)
	f.Add([]byte(indexMagic))
	f.Add(append([]byte(indexMagic), 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01))
	f.Fuzz(func(t *testing.T, b []byte) {
		x, err := DecodeIndex(b)
		if err != nil {
			return
		}
		again, err := EncodeIndex(*x)
		if err != nil {
			t.Fatalf("a decoded index does not encode: %v", err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("re-encoding changed the bytes")
		}
		for _, e := range x.Entries {
			if got, ok := x.Lookup(e.Digest); !ok || got != e {
				t.Fatalf("lookup of %s failed", e.Digest)
			}
		}
		sizes := make([]int64, x.Packs)
		for i := range sizes {
			sizes[i] = 1 << 30
		}
		_ = CheckIndex(x, sizes)
	})
}
