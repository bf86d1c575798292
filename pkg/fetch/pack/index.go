package pack

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// The object index (docs/oci-artifact.md, "Object index"): for every
// object of the image, its fs-verity digest, its size, the pack that holds
// it and where its bytes start in that pack (a multiple of 512, tar's block
// size), sorted by digest:
//
//	magic    "CFSOIDX1"
//	uvarint  number of packs
//	uvarint  number of entries
//	entries  32-byte digest, uvarint size, uvarint pack, uvarint offset/512
const indexMagic = "CFSOIDX1"

// Limits on an index from a source.
const (
	// MaxIndexBytes bounds an index download (about 1.5 million objects).
	MaxIndexBytes = 64 << 20
	// maxIndexEntries bounds its entries (an image's inode limit).
	maxIndexEntries = 4_000_000
	// MaxPacks bounds the packs one index names (an OCI artifact's
	// shards times their layers).
	MaxPacks = 1000 * 100
	// minEntryBytes is the smallest encoded entry (digest and three
	// one-byte varints).
	minEntryBytes = cfs.DigestSize + 3
	// BlockSize is tar's block: objects start at a multiple of it.
	BlockSize = 512
)

// Entry says where one object is.
type Entry struct {
	Digest cfs.Digest
	Size   uint64
	Pack   int
	Offset int64 // of the object's first byte in the pack blob
}

// Index is a decoded index: entries sorted by digest.
type Index struct {
	Packs   int
	Entries []Entry
}

// Lookup finds the entry of d.
func (x *Index) Lookup(d cfs.Digest) (Entry, bool) {
	i := sort.Search(len(x.Entries), func(i int) bool { return bytes.Compare(x.Entries[i].Digest[:], d[:]) >= 0 })
	if i < len(x.Entries) && x.Entries[i].Digest == d {
		return x.Entries[i], true
	}
	return Entry{}, false
}

// EncodeIndex encodes an index; entries are sorted by digest first.
func EncodeIndex(x Index) ([]byte, error) {
	ents := append([]Entry(nil), x.Entries...)
	sort.Slice(ents, func(i, j int) bool { return bytes.Compare(ents[i].Digest[:], ents[j].Digest[:]) < 0 })
	var b bytes.Buffer
	b.WriteString(indexMagic)
	b.Write(binary.AppendUvarint(nil, uint64(x.Packs)))
	b.Write(binary.AppendUvarint(nil, uint64(len(ents))))
	var buf [3 * binary.MaxVarintLen64]byte
	for i, e := range ents {
		if i > 0 && ents[i-1].Digest == e.Digest {
			return nil, fmt.Errorf("object index: object %s listed twice", e.Digest)
		}
		if e.Pack < 0 || e.Pack >= x.Packs {
			return nil, fmt.Errorf("object index: object %s in pack %d of %d", e.Digest, e.Pack, x.Packs)
		}
		if e.Offset < 0 || e.Offset%BlockSize != 0 {
			return nil, fmt.Errorf("object index: object %s at offset %d, not a multiple of %d", e.Digest, e.Offset, BlockSize)
		}
		b.Write(e.Digest[:])
		n := binary.PutUvarint(buf[:], e.Size)
		n += binary.PutUvarint(buf[n:], uint64(e.Pack))
		n += binary.PutUvarint(buf[n:], uint64(e.Offset/BlockSize))
		b.Write(buf[:n])
	}
	return b.Bytes(), nil
}

// DecodeIndex decodes an index of untrusted bytes: the magic, counts within
// bounds, strictly increasing digests, pack numbers below the pack count,
// canonical varints and no trailing bytes. Sizes and offsets are checked
// against the packs by the caller (CheckIndex).
func DecodeIndex(b []byte) (*Index, error) {
	if len(b) > MaxIndexBytes {
		return nil, fmt.Errorf("object index is %d bytes, more than %d", len(b), MaxIndexBytes)
	}
	if !bytes.HasPrefix(b, []byte(indexMagic)) {
		return nil, errors.New("object index: bad magic (not a version 1 index)")
	}
	r := indexReader{b: b[len(indexMagic):]}
	packs, err := r.uvarint("pack count")
	if err != nil {
		return nil, err
	}
	if packs > MaxPacks {
		return nil, fmt.Errorf("object index: %d packs, more than %d", packs, MaxPacks)
	}
	count, err := r.uvarint("entry count")
	if err != nil {
		return nil, err
	}
	if count > maxIndexEntries || count > uint64(len(r.b)/minEntryBytes) {
		return nil, fmt.Errorf("object index: %d entries do not fit (at most %d, and %d bytes follow)", count, maxIndexEntries, len(r.b))
	}
	x := &Index{Packs: int(packs), Entries: make([]Entry, 0, count)}
	for i := uint64(0); i < count; i++ {
		if len(r.b) < cfs.DigestSize {
			return nil, fmt.Errorf("object index: entry %d truncated", i)
		}
		var e Entry
		copy(e.Digest[:], r.b)
		r.b = r.b[cfs.DigestSize:]
		if i > 0 && bytes.Compare(x.Entries[i-1].Digest[:], e.Digest[:]) >= 0 {
			return nil, fmt.Errorf("object index: entry %d (%s) is not after the previous one", i, e.Digest)
		}
		if e.Digest.IsZero() {
			return nil, fmt.Errorf("object index: entry %d has the zero digest", i)
		}
		if e.Size, err = r.uvarint("size"); err != nil {
			return nil, err
		}
		if e.Size == 0 || e.Size > 1<<50 {
			return nil, fmt.Errorf("object index: object %s has size %d", e.Digest, e.Size)
		}
		p, err := r.uvarint("pack")
		if err != nil {
			return nil, err
		}
		if p >= packs {
			return nil, fmt.Errorf("object index: object %s in pack %d of %d", e.Digest, p, packs)
		}
		e.Pack = int(p)
		off, err := r.uvarint("offset")
		if err != nil {
			return nil, err
		}
		if off > 1<<50/BlockSize {
			return nil, fmt.Errorf("object index: object %s at block %d", e.Digest, off)
		}
		e.Offset = int64(off) * BlockSize
		x.Entries = append(x.Entries, e)
	}
	if len(r.b) != 0 {
		return nil, fmt.Errorf("object index: %d trailing bytes", len(r.b))
	}
	return x, nil
}

type indexReader struct{ b []byte }

func (r *indexReader) uvarint(what string) (uint64, error) {
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		return 0, fmt.Errorf("object index: bad %s", what)
	}
	// Only the shortest encoding: one index, one byte sequence.
	if n != len(binary.AppendUvarint(nil, v)) {
		return 0, fmt.Errorf("object index: %s is not minimally encoded", what)
	}
	r.b = r.b[n:]
	return v, nil
}

// CheckIndex checks an index against its packs' sizes: as many packs,
// and every object inside its pack after a tar header. The objects of an
// image must all be in it (checked when the image is known: checkObjects).
func CheckIndex(x *Index, packs []int64) error {
	if x.Packs != len(packs) {
		return fmt.Errorf("object index names %d packs, there are %d", x.Packs, len(packs))
	}
	for _, e := range x.Entries {
		if e.Offset < BlockSize || uint64(e.Offset)+e.Size > uint64(packs[e.Pack]) {
			return fmt.Errorf("object index: object %s (%d bytes at %d) is not inside pack %d (%d bytes)",
				e.Digest, e.Size, e.Offset, e.Pack, packs[e.Pack])
		}
	}
	return nil
}
