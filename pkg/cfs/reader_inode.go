package cfs

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"
)

// This file reads one inode and checks it on its own: its header, xattr
// body (inline and shared entries), data layout, inline tail, data blocks,
// directory entries, symlink target and the overlay xattrs composefs
// writes. The walk (reader_walk.go) checks how inodes fit together.

// rdInode is one inode as parsed and checked, before the overlay
// interpretation of §2.15. Its slices point into the parser's buffers:
// dirents stay valid until the parser reads another directory at the same
// depth, everything else until it reads another inode.
type rdInode struct {
	nid      uint64
	off      int64 // nid × 32
	format   uint16
	extended bool
	layout   uint8
	mode     uint32
	nlink    uint32
	uid, gid uint32
	size     uint64
	mtime    Timespec
	ino      uint32
	u        uint32
	xattrs   []rdXattr
	symlink  []byte
	data     []byte     // inline content of a flat regular file
	dirents  []rdDirent // a directory's entries in stored order
	dirData  []byte     // its blocks and tail, which hold the names
	// redirect is the raw trusted.overlay.redirect value.
	redirect    []byte
	hasRedirect bool
	hasMetacopy bool
	hasDigest   bool // metacopy carries a digest
	digest      Digest
	extent      int64 // bytes in the inode table: header, xattrs, inline tail
}

func (ri *rdInode) typ() uint32 { return ri.mode & ModeTypeMask }

// name returns the name of one of the directory's entries.
func (ri *rdInode) name(d *rdDirent) []byte {
	return ri.dirData[d.off : d.off+uint32(d.nlen) : d.off+uint32(d.nlen)]
}

// rdXattr is one stored xattr entry; its full key is the prefix of index
// followed by name.
type rdXattr struct {
	index  uint8
	shared bool
	id     uint32 // shared xattr id
	name   []byte
	value  []byte
}

// is reports whether the entry's full key is key.
func (x *rdXattr) is(key string) bool {
	p := rdXattrPrefixes[x.index]
	return len(key) == len(p)+len(x.name) && key[:len(p)] == p && key[len(p):] == string(x.name)
}

// hasPrefix reports whether the entry's full key starts with prefix.
func (x *rdXattr) hasPrefix(prefix string) bool {
	p := rdXattrPrefixes[x.index]
	if len(prefix) <= len(p) {
		return p[:len(prefix)] == prefix
	}
	return prefix[:len(p)] == p && bytes.HasPrefix(x.name, []byte(prefix[len(p):]))
}

// appendKey appends the full key to b.
func (x *rdXattr) appendKey(b []byte) []byte {
	return append(append(b, rdXattrPrefixes[x.index]...), x.name...)
}

// rdDirent is one stored directory entry, "." and ".." included; its name
// is dirData[off:off+nlen] of its directory.
type rdDirent struct {
	nid  uint64
	off  uint32
	nlen uint8
	ft   uint8
}

// rdParser reads inodes into reused buffers, so that a walk allocates
// little beyond what it keeps.
type rdParser struct {
	src *rdSource
	sb  *rdSuper
	bud rdBudget

	ino    rdInode // the inode read last (directories: in dirs)
	head   [rdExtendedSize]byte
	body   []byte // xattr body
	shared []byte // shared xattr entries read for this inode
	tail   []byte // inline tail / data of a non-directory
	keyBuf []int  // for the duplicate key check
	ka, kb []byte // keys being compared

	dirs []rdDirBuf // per depth
}

type rdDirBuf struct {
	ino     rdInode
	data    []byte
	dirents []rdDirent
}

func newParser(src *rdSource, sb *rdSuper) *rdParser {
	return &rdParser{src: src, sb: sb, bud: rdNewBudget(src.size)}
}

// parse reads and checks the inode nid; a directory's buffers are those of
// depth, which must not be in use by a directory still being walked.
func (p *rdParser) parse(nid uint64, depth int) (*rdInode, error) {
	le := binary.LittleEndian
	s := p.src
	if nid > uint64(s.size)>>rdSlotBits {
		return nil, rdCorrupt(nid, "nid out of range")
	}
	off := int64(nid << rdSlotBits)
	if off < rdInodeStart || off+rdCompactSize > s.size {
		return nil, rdCorrupt(nid, "nid out of range (offset %d, image %d bytes)", off, s.size)
	}
	h := p.head[:]
	if err := s.readAt(h[:rdCompactSize], off); err != nil {
		return nil, fmt.Errorf("nid %d: %w", nid, err)
	}
	format := le.Uint16(h[0:])
	mode := uint32(le.Uint16(h[4:]))
	ri := &p.ino
	if mode&ModeTypeMask == ModeDir {
		for len(p.dirs) <= depth {
			p.dirs = append(p.dirs, rdDirBuf{})
		}
		ri = &p.dirs[depth].ino
	}
	*ri = rdInode{nid: nid, off: off, format: format, mode: mode, xattrs: ri.xattrs[:0]}
	if format&^0xf != 0 {
		return nil, fmt.Errorf("%w: nid %d: unknown i_format bits %#x", ErrUnsupported, nid, format)
	}
	ri.extended = format&1 != 0
	ri.layout = uint8(format >> 1 & 7)
	if ri.layout != rdLayoutPlain && ri.layout != rdLayoutInline && ri.layout != rdLayoutChunk {
		return nil, fmt.Errorf("%w: nid %d: data layout %d (compressed?) is not used by composefs", ErrUnsupported, nid, ri.layout)
	}
	icount := le.Uint16(h[2:])
	isize := int64(rdCompactSize)
	if ri.extended {
		isize = rdExtendedSize
		if err := s.readAt(h[rdCompactSize:], off+rdCompactSize); err != nil {
			return nil, fmt.Errorf("nid %d: extended inode: %w", nid, err)
		}
		ri.size = le.Uint64(h[8:])
		ri.u = le.Uint32(h[16:])
		ri.ino = le.Uint32(h[20:])
		ri.uid = le.Uint32(h[24:])
		ri.gid = le.Uint32(h[28:])
		ri.mtime = Timespec{Sec: int64(le.Uint64(h[32:])), Nsec: le.Uint32(h[40:])}
		ri.nlink = le.Uint32(h[44:])
	} else {
		ri.nlink = uint32(le.Uint16(h[6:]))
		ri.size = uint64(le.Uint32(h[8:]))
		if r := le.Uint32(h[12:]); r != 0 {
			// Newer kernels read this as an mtime offset from build_time;
			// composefs writes 0. Refuse the ambiguity.
			return nil, fmt.Errorf("%w: nid %d: compact inode with non-zero i_reserved %#x", ErrUnsupported, nid, r)
		}
		ri.u = le.Uint32(h[16:])
		ri.ino = le.Uint32(h[20:])
		ri.uid = uint32(le.Uint16(h[24:]))
		ri.gid = uint32(le.Uint16(h[26:]))
		ri.mtime = p.sb.buildTime
	}
	switch ri.typ() {
	case ModeRegular, ModeDir, ModeSymlink, ModeChar, ModeBlock, ModeFIFO, ModeSocket:
	default:
		return nil, rdCorrupt(nid, "invalid file type in mode %#o", ri.mode)
	}

	// Xattr body.
	xsize := int64(0)
	if icount > 0 {
		xsize = 12 + 4*(int64(icount)-1)
	}
	tailOff := off + isize + xsize
	if err := s.check(off, isize+xsize); err != nil {
		return nil, fmt.Errorf("nid %d: inode and xattrs: %w", nid, err)
	}
	if xsize > 0 {
		if err := p.parseXattrs(ri, off+isize, xsize); err != nil {
			return nil, err
		}
	}

	// Data.
	tail := int64(0)
	var err error
	switch ri.typ() {
	case ModeDir:
		tail, err = p.parseDir(ri, tailOff, depth)
	case ModeRegular:
		tail, err = p.parseRegular(ri, tailOff)
	case ModeSymlink:
		tail, err = p.parseSymlink(ri, tailOff)
	default:
		if ri.layout != rdLayoutPlain {
			err = rdCorrupt(nid, "special file %#o with data layout %d", ri.mode, ri.layout)
		}
	}
	if err != nil {
		return nil, err
	}
	ri.extent = isize + xsize + tail
	if err := s.check(off, ri.extent); err != nil {
		return nil, fmt.Errorf("nid %d: %w", nid, err)
	}
	if err := rdSpend(&p.bud.meta, ri.extent, "inode bytes", nid); err != nil {
		return nil, err
	}
	if err := ri.checkOverlayXattrs(); err != nil {
		return nil, err
	}
	return ri, nil
}

// checkTail checks an inline tail: non-empty, not crossing a block, in the
// image.
func (p *rdParser) checkTail(nid uint64, off, n int64) error {
	if n <= 0 || n >= rdBlk {
		return rdCorrupt(nid, "inline tail of %d bytes", n)
	}
	if off/rdBlk != (off+n-1)/rdBlk {
		return rdCorrupt(nid, "inline tail at %d (+%d) crosses a block boundary", off, n)
	}
	if err := p.src.check(off, n); err != nil {
		return fmt.Errorf("nid %d: inline tail: %w", nid, err)
	}
	return nil
}

// inlineTail checks an inline tail of n bytes at off and reads it into
// dst[:n] (dst has room for it).
func (p *rdParser) inlineTail(dst []byte, nid uint64, off, n int64) ([]byte, error) {
	if err := p.checkTail(nid, off, n); err != nil {
		return nil, err
	}
	dst = dst[:n]
	if err := p.src.readAt(dst, off); err != nil {
		return nil, fmt.Errorf("nid %d: inline tail: %w", nid, err)
	}
	return dst, nil
}

// checkBlocks checks that n full data blocks from block blkaddr lie in the
// image and fit the data budget, before anything is allocated for them.
func (p *rdParser) checkBlocks(ri *rdInode, blkaddr uint32, n int64) error {
	s := p.src
	if n == 0 {
		return nil
	}
	if blkaddr == 0 {
		return rdCorrupt(ri.nid, "data at block 0")
	}
	start := int64(blkaddr) * rdBlk
	if n > s.size/rdBlk {
		return rdCorrupt(ri.nid, "%d data blocks in an image of %d bytes", n, s.size)
	}
	if err := s.check(start, n*rdBlk); err != nil {
		return fmt.Errorf("nid %d: data blocks %d+%d: %w", ri.nid, blkaddr, n, err)
	}
	return rdSpend(&p.bud.data, n*rdBlk, "data blocks", ri.nid)
}

// readBlocks fills dst (whole blocks, checked by checkBlocks) from block
// blkaddr on.
func (p *rdParser) readBlocks(dst []byte, blkaddr uint32) error {
	if len(dst) == 0 {
		return nil
	}
	return p.src.readLarge(dst, int64(blkaddr)*rdBlk)
}

// blockSplit returns how many full data blocks an inode of a flat layout
// has and how long its inline tail is; an inline layout with an empty tail
// is corrupt.
func (ri *rdInode) blockSplit(what string) (full, tail int64, err error) {
	size := int64(ri.size)
	if ri.layout != rdLayoutInline {
		return (size + rdBlk - 1) / rdBlk, 0, nil
	}
	full, tail = size/rdBlk, size%rdBlk
	if tail == 0 {
		return 0, 0, rdCorrupt(ri.nid, "inline %s with an empty tail (size %d)", what, size)
	}
	return full, tail, nil
}

func (p *rdParser) parseDir(ri *rdInode, tailOff int64, depth int) (int64, error) {
	nid := ri.nid
	if ri.layout == rdLayoutChunk {
		return 0, rdCorrupt(nid, "chunk-based directory")
	}
	if ri.size == 0 || ri.size > uint64(p.src.size) {
		return 0, rdCorrupt(nid, "directory size %d", ri.size)
	}
	size := int64(ri.size)
	full, tail, err := ri.blockSplit("directory")
	if err != nil {
		return 0, err
	}
	db := &p.dirs[depth]
	if err := p.checkBlocks(ri, ri.u, full); err != nil {
		return 0, err
	}
	// The blocks and the tail share one buffer (size ≤ the image size, so
	// at most that much): names point into it.
	blocks := db.data
	if n := int(full*rdBlk + tail); cap(blocks) < n {
		blocks = make([]byte, n) // no room to spare: the largest directory of each depth is kept
	}
	blocks = blocks[:full*rdBlk+tail]
	db.data = blocks
	ri.dirData = blocks
	if err := p.readBlocks(blocks[:full*rdBlk], ri.u); err != nil {
		return 0, err
	}
	if tail > 0 {
		if _, err := p.inlineTail(blocks[full*rdBlk:], nid, tailOff, tail); err != nil {
			return 0, err
		}
	}
	// Room for exactly the entries the chunks claim (checked below).
	count := 0
	for i := int64(0); i < full; i++ {
		count += int(binary.LittleEndian.Uint16(blocks[i*rdBlk+8:])) / rdDirentSize
	}
	if tail >= rdDirentSize {
		count += int(binary.LittleEndian.Uint16(blocks[full*rdBlk+8:])) / rdDirentSize
	}
	if cap(db.dirents) < count {
		db.dirents = make([]rdDirent, 0, count)
	}
	ri.dirents = db.dirents[:0]
	var prev []byte
	for i := int64(0); i < full; i++ {
		end := (i + 1) * rdBlk
		if ri.layout == rdLayoutPlain && i == full-1 && size%rdBlk != 0 {
			end = i*rdBlk + size%rdBlk
		}
		if prev, err = ri.parseDirents(i*rdBlk, end, prev); err != nil {
			return 0, err
		}
	}
	if tail > 0 {
		if _, err = ri.parseDirents(full*rdBlk, full*rdBlk+tail, prev); err != nil {
			return 0, err
		}
	}
	db.dirents = ri.dirents
	var dot, dotdot bool
	for i := range ri.dirents {
		d := &ri.dirents[i]
		switch string(ri.name(d)) {
		case ".":
			dot = true
			if d.nid != nid {
				return 0, rdCorrupt(nid, "\".\" points at nid %d", d.nid)
			}
		case "..":
			dotdot = true
		}
	}
	if !dot || !dotdot {
		return 0, rdCorrupt(nid, "directory lacks \".\" or \"..\"")
	}
	return tail, nil
}

// parseDirents decodes one directory chunk (a block or the inline tail:
// dirData[start:end]), checking that names are valid and strictly
// increasing across chunks (prev is the last name so far, nil before the
// first).
func (ri *rdInode) parseDirents(start0, end0 int64, prev []byte) ([]byte, error) {
	le := binary.LittleEndian
	nid := ri.nid
	chunk := ri.dirData[start0:end0:end0]
	if len(chunk) < rdDirentSize {
		return nil, rdCorrupt(nid, "directory chunk of %d bytes", len(chunk))
	}
	nameoff0 := int(le.Uint16(chunk[8:]))
	if nameoff0 < rdDirentSize || nameoff0%rdDirentSize != 0 || nameoff0 >= len(chunk) {
		return nil, rdCorrupt(nid, "first dirent nameoff %d in a %d-byte chunk", nameoff0, len(chunk))
	}
	n := nameoff0 / rdDirentSize
	for i := 0; i < n; i++ {
		d := chunk[i*rdDirentSize:]
		start := int(le.Uint16(d[8:]))
		var end int
		if i+1 < n {
			end = int(le.Uint16(chunk[(i+1)*rdDirentSize+8:]))
		} else {
			end = len(chunk)
			if start < end {
				if j := bytes.IndexByte(chunk[start:], 0); j >= 0 {
					end = start + j
				}
			}
		}
		if start < nameoff0 || end <= start || end > len(chunk) {
			return nil, rdCorrupt(nid, "dirent %d: name offsets %d..%d invalid in a %d-byte chunk", i, start, end, len(chunk))
		}
		name := chunk[start:end:end]
		if len(name) > MaxNameLen {
			return nil, rdCorrupt(nid, "dirent name of %d bytes", len(name))
		}
		if bytes.IndexByte(name, 0) >= 0 || bytes.IndexByte(name, '/') >= 0 {
			return nil, rdCorrupt(nid, "dirent name %q contains NUL or '/'", truncateForError(string(name)))
		}
		if prev != nil && bytes.Compare(name, prev) <= 0 {
			return nil, rdCorrupt(nid, "dirent %q not after %q (unsorted or duplicate names)", truncateForError(string(name)), truncateForError(string(prev)))
		}
		prev = name
		ft := d[10]
		if ft > 7 {
			return nil, rdCorrupt(nid, "dirent %q: file type %d", truncateForError(string(name)), ft)
		}
		ri.dirents = append(ri.dirents, rdDirent{nid: le.Uint64(d[0:]), off: uint32(start0) + uint32(start), nlen: uint8(len(name)), ft: ft})
	}
	return prev, nil
}

func (p *rdParser) parseRegular(ri *rdInode, tailOff int64) (int64, error) {
	nid := ri.nid
	switch ri.layout {
	case rdLayoutChunk:
		if ri.size == 0 {
			return 0, rdCorrupt(nid, "empty chunk-based file")
		}
		// i_u holds the chunk format in its low 16 bits; the kernel
		// ignores the high 16, which composefs leaves 0 except for a map
		// that does not fit beside the inode (below).
		if ri.u&0xffe0 != 0 || (ri.u&^0x1f != 0 && !p.src.unreadable) {
			return 0, fmt.Errorf("%w: nid %d: chunk format %#x (only 4-byte block maps are written by composefs)", ErrUnsupported, nid, ri.u)
		}
		chunkBits := rdBlkBits + uint(ri.u&0x1f)
		count := (ri.size-1)>>chunkBits + 1
		if count > rdMaxChunks {
			return 0, rdCorrupt(nid, "%d chunks for size %d", count, ri.size)
		}
		mapLen := int64(count) * 4
		if tailOff/rdBlk != (tailOff+mapLen-1)/rdBlk {
			// mkcomposefs puts a map that does not fit beside its inode
			// (files over ~8.7 PB) in a block of holes the inode does not
			// point at; the kernel reads the map from here, where other
			// inodes or padding lie, and serves whatever blocks those
			// bytes name (zeros: the image's first block) as file data.
			if !p.src.unreadable {
				return 0, fmt.Errorf("%w: nid %d: a %d-byte file whose %d-byte chunk map does not fit beside its inode (the kernel would take the bytes after the inode for its map)", ErrUnsupported, nid, ri.size, mapLen)
			}
			if err := p.src.check(tailOff, mapLen); err != nil {
				return 0, fmt.Errorf("nid %d: chunk map: %w", nid, err)
			}
			return 0, nil // not part of this inode; composefs-info does not read it either
		}
		if err := p.src.check(tailOff, mapLen); err != nil {
			return 0, fmt.Errorf("nid %d: chunk map: %w", nid, err)
		}
		idx := scratch(p.tail, int(mapLen))
		p.tail = idx
		if err := p.src.readAt(idx, tailOff); err != nil {
			return 0, fmt.Errorf("nid %d: chunk map: %w", nid, err)
		}
		for i := 0; i < len(idx); i += 4 {
			if binary.LittleEndian.Uint32(idx[i:]) != rdNullAddr {
				return 0, rdCorrupt(nid, "chunk %d is not a hole (composefs files have no data in the image)", i/4)
			}
		}
		return mapLen, nil
	case rdLayoutPlain, rdLayoutInline:
		if ri.size == 0 {
			if ri.layout != rdLayoutPlain {
				return 0, rdCorrupt(nid, "empty file with inline layout")
			}
			return 0, nil
		}
		if ri.size > MaxInlineContent {
			return 0, rdCorrupt(nid, "inline file of %d bytes (composefs inlines at most %d)", ri.size, MaxInlineContent)
		}
		size := int64(ri.size)
		full, tail, err := ri.blockSplit("file")
		if err != nil {
			return 0, err
		}
		if err := p.checkBlocks(ri, ri.u, full); err != nil {
			return 0, err
		}
		buf := scratch(p.tail, int(full*rdBlk+tail)) // ≤ 5000 + 4 KiB
		p.tail = buf
		if err := p.readBlocks(buf[:full*rdBlk], ri.u); err != nil {
			return 0, err
		}
		data := buf[:full*rdBlk]
		if ri.layout == rdLayoutPlain {
			data = data[:size]
		}
		if tail > 0 {
			if _, err := p.inlineTail(buf[full*rdBlk:], nid, tailOff, tail); err != nil {
				return 0, err
			}
			data = buf[:full*rdBlk+tail]
		}
		ri.data = data
		return tail, nil
	}
	return 0, rdCorrupt(nid, "layout %d", ri.layout)
}

func (p *rdParser) parseSymlink(ri *rdInode, tailOff int64) (int64, error) {
	nid := ri.nid
	if ri.size == 0 || ri.size > MaxSymlinkLen {
		return 0, rdCorrupt(nid, "symlink target of %d bytes", ri.size)
	}
	size := int64(ri.size)
	var target []byte
	var tail int64
	switch ri.layout {
	case rdLayoutInline:
		p.tail = scratch(p.tail, int(size))
		t, err := p.inlineTail(p.tail, nid, tailOff, size)
		if err != nil {
			return 0, err
		}
		target, tail = t, size
	case rdLayoutPlain:
		if err := p.checkBlocks(ri, ri.u, 1); err != nil {
			return 0, err
		}
		p.tail = scratch(p.tail, rdBlk)
		if err := p.readBlocks(p.tail, ri.u); err != nil {
			return 0, err
		}
		target = p.tail[:size]
	default:
		return 0, rdCorrupt(nid, "chunk-based symlink")
	}
	if bytes.IndexByte(target, 0) >= 0 {
		return 0, rdCorrupt(nid, "symlink target contains NUL")
	}
	ri.symlink = target
	return tail, nil
}

// parseXattrs decodes the inode xattr body at off (xsize bytes): inline
// entries first, then the shared ones, as the C reader orders them.
func (p *rdParser) parseXattrs(ri *rdInode, off, xsize int64) error {
	le := binary.LittleEndian
	s := p.src
	nid := ri.nid
	p.body = scratch(p.body, int(xsize))
	body := p.body
	if err := s.readAt(body, off); err != nil {
		return fmt.Errorf("nid %d: xattrs: %w", nid, err)
	}
	nShared := int64(body[4])
	pos := 12 + 4*nShared
	if pos > xsize {
		return rdCorrupt(nid, "%d shared xattrs do not fit in a %d-byte xattr body", nShared, xsize)
	}
	xs := ri.xattrs[:0]
	for pos < xsize {
		x, esize, err := rdParseXattrEntry(body[pos:], nid)
		if err != nil {
			return err
		}
		if err := rdSpend(&p.bud.xattr, int64(len(rdXattrPrefixes[x.index])+len(x.name)+len(x.value)), "xattr bytes", nid); err != nil {
			return err
		}
		xs = append(xs, x)
		pos += esize
	}
	// Shared entries are read one after the other into p.shared; their
	// slices are taken once all are read (the buffer may move).
	base := int64(p.sb.xattrBlkaddr) * rdBlk
	sharedStart := len(xs)
	buf := p.shared[:0]
	var ends [256]int
	for i := int64(0); i < nShared; i++ {
		id := le.Uint32(body[12+4*i:])
		eoff := base + int64(id)*4
		if eoff < rdInodeStart || eoff+4 > s.size {
			return rdCorrupt(nid, "shared xattr id %d out of range", id)
		}
		var eh [4]byte
		if err := s.readAt(eh[:], eoff); err != nil {
			return fmt.Errorf("nid %d: shared xattr %d: %w", nid, id, err)
		}
		elen := 4 + int64(eh[0]) + int64(le.Uint16(eh[2:]))
		if err := s.check(eoff, elen); err != nil {
			return fmt.Errorf("nid %d: shared xattr %d: %w", nid, id, err)
		}
		if err := rdSpend(&p.bud.xattr, elen, "xattr bytes", nid); err != nil {
			return err
		}
		start := len(buf)
		buf = slices.Grow(buf, int(elen))[:start+int(elen)]
		if err := s.readAt(buf[start:], eoff); err != nil {
			return err
		}
		ends[i] = len(buf)
		xs = append(xs, rdXattr{shared: true, id: id})
	}
	p.shared = buf
	start := 0
	for i := sharedStart; i < len(xs); i++ {
		end := ends[i-sharedStart]
		x, _, err := rdParseXattrEntry(buf[start:end], nid)
		if err != nil {
			return fmt.Errorf("shared xattr %d: %w", xs[i].id, err)
		}
		x.shared, x.id = true, xs[i].id
		xs[i] = x
		start = end
	}
	ri.xattrs = xs
	// Keys are unique per inode.
	if dup := p.duplicateKey(xs); dup != nil {
		return rdCorrupt(nid, "duplicate xattr %q", truncateForError(string(dup.appendKey(nil))))
	}
	return nil
}

// duplicateKey returns an entry whose full key another entry has too.
func (p *rdParser) duplicateKey(xs []rdXattr) *rdXattr {
	same := func(a, b *rdXattr) bool {
		if a.index == b.index {
			return bytes.Equal(a.name, b.name)
		}
		if len(rdXattrPrefixes[a.index])+len(a.name) != len(rdXattrPrefixes[b.index])+len(b.name) {
			return false
		}
		p.ka, p.kb = a.appendKey(p.ka[:0]), b.appendKey(p.kb[:0])
		return bytes.Equal(p.ka, p.kb)
	}
	if len(xs) <= 16 {
		for i := 1; i < len(xs); i++ {
			for j := 0; j < i; j++ {
				if same(&xs[i], &xs[j]) {
					return &xs[i]
				}
			}
		}
		return nil
	}
	idx := p.keyBuf[:0]
	for i := range xs {
		idx = append(idx, i)
	}
	p.keyBuf = idx
	slices.SortFunc(idx, func(i, j int) int {
		p.ka, p.kb = xs[i].appendKey(p.ka[:0]), xs[j].appendKey(p.kb[:0])
		return bytes.Compare(p.ka, p.kb)
	})
	for i := 1; i < len(idx); i++ {
		if same(&xs[idx[i]], &xs[idx[i-1]]) {
			return &xs[idx[i]]
		}
	}
	return nil
}

// rdParseXattrEntry decodes one entry at the start of b and returns it with
// its padded size.
func rdParseXattrEntry(b []byte, nid uint64) (rdXattr, int64, error) {
	if len(b) < 4 {
		return rdXattr{}, 0, rdCorrupt(nid, "truncated xattr entry")
	}
	nameLen := int64(b[0])
	index := b[1]
	vlen := int64(binary.LittleEndian.Uint16(b[2:]))
	end := 4 + nameLen + vlen
	if end > int64(len(b)) {
		return rdXattr{}, 0, rdCorrupt(nid, "xattr entry of %d bytes overruns its area (%d bytes)", end, len(b))
	}
	if int(index) >= len(rdXattrPrefixes) {
		return rdXattr{}, 0, rdCorrupt(nid, "xattr name index %d", index)
	}
	name := b[4 : 4+nameLen : 4+nameLen]
	if index == 0 && nameLen == 0 {
		return rdXattr{}, 0, rdCorrupt(nid, "xattr with an empty name")
	}
	if bytes.IndexByte(name, 0) >= 0 {
		return rdXattr{}, 0, rdCorrupt(nid, "xattr name contains NUL")
	}
	x := rdXattr{index: index, name: name, value: b[4+nameLen : end : end]}
	return x, (end + 3) &^ 3, nil
}

// checkOverlayXattrs validates the composefs overlay xattrs of an inode.
func (ri *rdInode) checkOverlayXattrs() error {
	nid := ri.nid
	for i := range ri.xattrs {
		x := &ri.xattrs[i]
		switch {
		case x.is(rdXattrRedirect):
			ri.redirect, ri.hasRedirect = x.value, true
		case x.is(rdXattrMetacopy):
			ri.hasMetacopy = true
			switch len(x.value) {
			case 0:
			case 4 + DigestSize:
				if x.value[0] != 0 || x.value[1] != 4+DigestSize || x.value[2] != 0 || x.value[3] != 1 {
					return rdCorrupt(nid, "metacopy header % x, want 00 24 00 01 (sha256)", x.value[:4])
				}
				copy(ri.digest[:], x.value[4:])
				ri.hasDigest = true
			default:
				return rdCorrupt(nid, "metacopy value of %d bytes (want 0 or 36)", len(x.value))
			}
		}
	}
	if ri.typ() != ModeRegular {
		return nil
	}
	if (ri.hasRedirect || ri.hasMetacopy) && ri.layout != rdLayoutChunk {
		return rdCorrupt(nid, "file with inline data carries overlay redirect/metacopy")
	}
	if ri.hasRedirect {
		if bytes.IndexByte(ri.redirect, 0) >= 0 {
			return rdCorrupt(nid, "redirect contains NUL")
		}
		if len(bytes.TrimPrefix(ri.redirect, []byte("/"))) == 0 {
			return rdCorrupt(nid, "empty redirect")
		}
	}
	return nil
}

// raw copies the inode into the exported RawInode.
func (ri *rdInode) raw() *RawInode {
	r := &RawInode{
		Nid: ri.nid, Offset: ri.off, Format: ri.format, Extended: ri.extended, Layout: ri.layout,
		Mode: ri.mode, Nlink: ri.nlink, UID: ri.uid, GID: ri.gid, Size: ri.size, Mtime: ri.mtime,
		Ino: ri.ino, U: ri.u, Symlink: string(ri.symlink), Redirect: string(ri.redirect),
		HasRedirect: ri.hasRedirect, HasMetacopy: ri.hasMetacopy, Extent: ri.extent,
	}
	if len(ri.data) > 0 {
		r.Data = bytes.Clone(ri.data)
	}
	if ri.hasDigest {
		d := ri.digest
		r.Metacopy = &d
	}
	for i := range ri.xattrs {
		x := &ri.xattrs[i]
		r.Xattrs = append(r.Xattrs, RawXattr{Index: x.index, Key: string(x.appendKey(nil)), Value: bytes.Clone(x.value), Shared: x.shared, SharedID: x.id})
	}
	for i := range ri.dirents {
		d := &ri.dirents[i]
		r.Dirents = append(r.Dirents, RawDirent{Name: string(ri.name(d)), Nid: d.nid, FileType: d.ft})
	}
	return r
}
