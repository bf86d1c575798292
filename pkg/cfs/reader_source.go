package cfs

import (
	"fmt"
	"io"
)

// rdSource reads bounds-checked byte ranges of the image through a small
// direct-mapped block cache. Every read of the parser goes through check:
// nothing outside [0, size) is ever read.
type rdSource struct {
	r     io.ReaderAt
	size  int64
	slots [rdCacheSlots]*rdCacheBlock
	// unreadable is OpenOptions.AllowUnreadableFiles.
	unreadable bool
}

// rdCacheSlots blocks of 4 KiB are cached: the inode table is read in BFS
// order while the walk goes depth first, so it comes back to blocks.
const rdCacheSlots = 128

type rdCacheBlock struct {
	blk  int64
	n    int
	data [rdBlk]byte
}

// check verifies that [off, off+n) lies within the image.
func (s *rdSource) check(off int64, n int64) error {
	if off < 0 || n < 0 || off > s.size || n > s.size-off {
		return fmt.Errorf("%w: range [%d, +%d) beyond the end of the image (%d bytes)", ErrCorrupt, off, n, s.size)
	}
	return nil
}

// readAt fills dst from offset off.
func (s *rdSource) readAt(dst []byte, off int64) error {
	if err := s.check(off, int64(len(dst))); err != nil {
		return err
	}
	for len(dst) > 0 {
		blk := off / rdBlk
		cb, err := s.block(blk)
		if err != nil {
			return err
		}
		in := int(off % rdBlk)
		if in >= cb.n {
			return fmt.Errorf("%w: short read at %d", ErrCorrupt, off)
		}
		c := copy(dst, cb.data[in:cb.n])
		dst = dst[c:]
		off += int64(c)
	}
	return nil
}

// readLarge fills dst from off, reading whole runs of blocks directly
// (directory and data blocks) rather than through the cache.
func (s *rdSource) readLarge(dst []byte, off int64) error {
	if len(dst) <= 2*rdBlk {
		return s.readAt(dst, off)
	}
	if err := s.check(off, int64(len(dst))); err != nil {
		return err
	}
	n, err := s.r.ReadAt(dst, off)
	if n < len(dst) {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("reading image bytes %d+%d: %w", off, len(dst), err)
	}
	return nil
}

func (s *rdSource) block(blk int64) (*rdCacheBlock, error) {
	i := blk % rdCacheSlots
	cb := s.slots[i]
	if cb != nil && cb.blk == blk {
		return cb, nil
	}
	if cb == nil {
		cb = new(rdCacheBlock)
		s.slots[i] = cb
	}
	cb.blk = -1
	want := min(int64(rdBlk), s.size-blk*rdBlk)
	n, err := s.r.ReadAt(cb.data[:want], blk*rdBlk)
	if int64(n) < want {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("reading image block %d: %w", blk, err)
	}
	cb.blk, cb.n = blk, int(want)
	return cb, nil
}

// bytes returns a fresh copy of [off, off+n).
func (s *rdSource) bytes(off int64, n int64) ([]byte, error) {
	if err := s.check(off, n); err != nil {
		return nil, err
	}
	b := make([]byte, n)
	return b, s.readAt(b, off)
}

// rdBudget bounds the work of a parse by the image size: in a valid image,
// inodes do not overlap, every data block belongs to one inode, so Σ inode
// extents and Σ data blocks read are each at most the image size. Xattrs
// may be shared, so their expansion gets a larger, still linear, budget.
type rdBudget struct {
	meta, data, xattr int64
}

func rdNewBudget(size int64) rdBudget {
	return rdBudget{meta: size, data: size, xattr: 16*size + 4<<20}
}

func rdSpend(b *int64, n int64, what string, nid uint64) error {
	if n > *b {
		return fmt.Errorf("%w: nid %d: %s exceed what the image size allows (overlapping or looping structures)", ErrCorrupt, nid, what)
	}
	*b -= n
	return nil
}

func rdCorrupt(nid uint64, format string, args ...any) error {
	return fmt.Errorf("%w: nid %d: %s", ErrCorrupt, nid, fmt.Sprintf(format, args...))
}

// scratch returns a buffer of n bytes, b's storage when it is large enough;
// the contents are not kept.
func scratch(b []byte, n int) []byte {
	if cap(b) >= n {
		return b[:n]
	}
	return make([]byte, n, max(n, 2*cap(b)))
}
