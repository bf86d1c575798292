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

// FuzzDecodeRepoIndex: any bytes decode or fail cleanly; what decodes
// encodes back to the same bytes, and every object is inside its pack.
func FuzzDecodeRepoIndex(f *testing.F) {
	var d1, d2, img cfs.Digest
	d1[0], d2[0], img[0] = 1, 2, 9
	good, _ := EncodeRepoIndex(RepoIndex{Image: img, Packs: []PackRef{{SHA256: [32]byte{1}, Size: 10240}, {SHA256: [32]byte{2}, Size: 1 << 21}},
		Index: Index{Packs: 2, Entries: []Entry{{Digest: d1, Size: 100, Pack: 0, Offset: 1024}, {Digest: d2, Size: 1 << 20, Pack: 1, Offset: 512}}}})
	f.Add(good)
	f.Add([]byte(repoIndexMagic))
	f.Add(good[:len(good)-3])
	f.Fuzz(func(t *testing.T, b []byte) {
		x, err := DecodeRepoIndex(b)
		if err != nil {
			return
		}
		again, err := EncodeRepoIndex(*x)
		if err != nil {
			t.Fatalf("a decoded pack index does not encode: %v", err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("re-encoding changed the bytes")
		}
		for _, e := range x.Index.Entries {
			if e.Offset < BlockSize || e.Offset+int64(e.Size) > x.Packs[e.Pack].Size {
				t.Fatalf("object %s outside its pack", e.Digest)
			}
		}
	})
}
