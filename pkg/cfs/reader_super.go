package cfs

import (
	"encoding/binary"
	"fmt"
)

// This file checks the composefs header and the EROFS superblock: magics,
// versions, flags and features composefs writes, and that the sizes and
// offsets they claim lie within the image.

func (img *Image) readHeaders(src *rdSource, size int64) error {
	le := binary.LittleEndian
	var hb [rdInodeStart]byte
	if size >= 4 {
		if err := src.readAt(hb[:4], 0); err != nil {
			return err
		}
		if m := le.Uint32(hb[0:]); m != rdHeaderMagic {
			return fmt.Errorf("%w: bad composefs magic %#08x (not a composefs image)", ErrCorrupt, m)
		}
	}
	if size < rdBlk {
		return fmt.Errorf("%w: image is %d bytes, smaller than one block", ErrCorrupt, size)
	}
	if err := src.readAt(hb[:], 0); err != nil {
		return err
	}
	if v := le.Uint32(hb[4:]); v != rdHeaderVersion {
		return fmt.Errorf("%w: composefs header version %d, want %d", ErrUnsupported, v, rdHeaderVersion)
	}
	img.flags = le.Uint32(hb[8:])
	if img.flags&^rdFlagHasACL != 0 {
		return fmt.Errorf("%w: unknown composefs header flags %#x", ErrUnsupported, img.flags)
	}
	img.version = le.Uint32(hb[12:])
	if img.version > rdMaxCfsVersion {
		// Version 2 is composefs-rs's layout; a future C version may
		// change semantics this reader cannot validate. Refuse.
		return fmt.Errorf("%w: composefs_version %d, this reader knows 0 and 1", ErrUnsupported, img.version)
	}
	sb := hb[rdSuperOffset:]
	if m := le.Uint32(sb[0:]); m != rdErofsMagic {
		return fmt.Errorf("%w: bad EROFS magic %#08x", ErrCorrupt, m)
	}
	if bits := sb[12]; bits != rdBlkBits {
		return fmt.Errorf("%w: EROFS block size 2^%d, want 4096", ErrUnsupported, bits)
	}
	if ext := sb[13]; ext != 0 {
		return fmt.Errorf("%w: EROFS superblock extension slots %d", ErrUnsupported, ext)
	}
	s := &img.sb
	s.rootNid = uint64(le.Uint16(sb[14:]))
	s.inos = le.Uint64(sb[16:])
	s.buildTime = Timespec{Sec: int64(le.Uint64(sb[24:])), Nsec: le.Uint32(sb[32:])}
	s.blocks = le.Uint32(sb[36:])
	if meta := le.Uint32(sb[40:]); meta != 0 {
		return fmt.Errorf("%w: EROFS meta_blkaddr %d, composefs uses 0", ErrUnsupported, meta)
	}
	s.xattrBlkaddr = le.Uint32(sb[44:])
	s.compat = le.Uint32(sb[8:])
	s.incompat = le.Uint32(sb[80:])
	if s.incompat&^rdIncompatChunked != 0 {
		return fmt.Errorf("%w: EROFS incompatible features %#x", ErrUnsupported, s.incompat)
	}
	if n := le.Uint16(sb[86:]); n != 0 {
		return fmt.Errorf("%w: EROFS extra devices %d", ErrUnsupported, n)
	}
	if n := sb[91]; n != 0 {
		return fmt.Errorf("%w: EROFS long xattr prefixes (%d)", ErrUnsupported, n)
	}
	if n := le.Uint64(sb[96:]); n != 0 {
		return fmt.Errorf("%w: EROFS packed inode %d", ErrUnsupported, n)
	}
	full := int64(s.blocks) * rdBlk
	if full > size {
		return fmt.Errorf("%w: superblock claims %d blocks (%d bytes) but the image is %d bytes (truncated?)", ErrCorrupt, s.blocks, full, size)
	}
	if full < rdBlk {
		return fmt.Errorf("%w: superblock claims %d blocks", ErrCorrupt, s.blocks)
	}
	img.size = full
	if int64(s.xattrBlkaddr)*rdBlk >= full {
		return fmt.Errorf("%w: xattr_blkaddr %d beyond the image (%d blocks)", ErrCorrupt, s.xattrBlkaddr, s.blocks)
	}
	if s.rootNid<<rdSlotBits < rdInodeStart || int64(s.rootNid<<rdSlotBits)+rdCompactSize > full {
		return fmt.Errorf("%w: root nid %d out of range", ErrCorrupt, s.rootNid)
	}
	if s.inos > uint64(full/rdCompactSize) {
		return fmt.Errorf("%w: superblock claims %d inodes, more than fit in %d bytes", ErrCorrupt, s.inos, full)
	}
	return nil
}
