package cfs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"sort"
	"strings"
)

// Errors of the image reader. Every error Open returns wraps one of them
// (or an I/O error of the underlying reader), with the nid and path of the
// offending inode where there is one.
var (
	// ErrCorrupt: the bytes are not a well-formed composefs image.
	ErrCorrupt = errors.New("corrupt composefs image")
	// ErrUnsupported: a well-formed image uses a feature or version this
	// reader does not accept (composefs_version > 1, EROFS features
	// composefs never writes, nesting deeper than OpenOptions.MaxDepth).
	ErrUnsupported = errors.New("unsupported composefs image")
	// ErrForeignRedirect: in strict mode, a trusted.overlay.redirect that is
	// not "/xx/" + 62 lowercase hex characters.
	ErrForeignRedirect = errors.New("redirect is not an object-store digest path")
	// ErrDigestMismatch: in strict mode, a redirect that names another
	// object than the fs-verity digest in trusted.overlay.metacopy.
	ErrDigestMismatch = errors.New("redirect does not match the metacopy digest")
)

// On-disk constants (see the format notes, §2).
const (
	rdHeaderMagic     = 0xd078629a
	rdHeaderVersion   = 1
	rdMaxCfsVersion   = 1
	rdFlagHasACL      = 1
	rdSuperOffset     = 1024
	rdErofsMagic      = 0xe0f5e1e2
	rdBlkBits         = 12
	rdBlk             = 1 << rdBlkBits
	rdInodeStart      = rdSuperOffset + 128 // first byte after the superblock
	rdSlotBits        = 5
	rdDirentSize      = 12
	rdDefaultMaxDepth = 1024
	rdMaxMaxDepth     = 1 << 16
	rdMaxChunks       = 1024
	// rdDefaultMaxInodes is OpenOptions.MaxInodes's default.
	rdDefaultMaxInodes = 4_000_000
	rdNullAddr         = 0xffffffff
	rdIncompatChunked  = 0x4

	rdLayoutPlain  = 0
	rdLayoutInline = 2
	rdLayoutChunk  = 4

	rdCompactSize  = 32
	rdExtendedSize = 64
)

// Overlay xattr names the reader interprets (§2.9, §2.15).
const (
	rdXattrRedirect      = "trusted.overlay.redirect"
	rdXattrMetacopy      = "trusted.overlay.metacopy"
	rdXattrEscWhiteout   = "trusted.overlay.overlay.whiteout"
	rdXattrEscWhiteouts  = "trusted.overlay.overlay.whiteouts"
	rdXattrUserWhiteout  = "user.overlay.whiteout"
	rdXattrUserWhiteouts = "user.overlay.whiteouts"
	rdOverlayPrefix      = "trusted.overlay."
	rdOverlayEscPrefix   = "trusted.overlay.overlay."
)

// rdXattrPrefixes maps e_name_index to its key prefix (index 0: full name).
var rdXattrPrefixes = [...]string{
	0: "",
	1: "user.",
	2: "system.posix_acl_access",
	3: "system.posix_acl_default",
	4: "trusted.",
	5: "lustre.",
	6: "security.",
}

// OpenOptions tune Open.
type OpenOptions struct {
	// AllowForeignRedirects accepts redirects that are not "/xx/"+62
	// lowercase hex (composefs-info accepts any payload; the golden vector
	// inline-tail has "xx/yy" and "//aa/bbbb"). Default false = strict: a
	// redirect must name an object by digest and agree with the metacopy
	// digest when there is one.
	AllowForeignRedirects bool
	// MaxDepth limits directory nesting; 0 means 1024. Values above 65536
	// are lowered to 65536.
	MaxDepth int
	// MaxInodes limits the number of inodes an image may have (the count
	// its superblock claims and the count the walk finds), bounding the
	// memory Open spends on an untrusted image; 0 means 4,000,000.
	MaxInodes int
	// AllowUnreadableFiles accepts what composefs-info and fsck.erofs
	// accept although the kernel cannot read it right: a regular file
	// whose chunk map does not fit beside its inode (mkcomposefs writes
	// files over ~8.7 PB so, with the map in a block the inode does not
	// point at; the kernel takes the bytes after the inode for the map).
	// Its chunk map is then not checked. Default false: such an image is
	// refused (ErrUnsupported), as it must be before a mount.
	AllowUnreadableFiles bool
}

// Object is a backing object an image needs.
type Object struct {
	// Path is the redirect with one leading '/' stripped, as
	// `composefs-info objects` prints it: "xx/yyyy…" for digest paths.
	Path string
	// Digest is the fs-verity digest Path names; zero if Path is not a
	// digest path (possible only with AllowForeignRedirects).
	Digest Digest
	// Size is the size of the (first) file that references the object.
	Size uint64
}

// ImageStats summarises an image.
type ImageStats struct {
	ImageSize        int64  // bytes the EROFS superblock covers
	Version          uint32 // composefs_version from the header
	SuperblockInodes uint64 // inode count the superblock claims (incl. the 00..ff whiteouts)
	Inodes           uint64 // distinct inodes of the reconstructed tree (hardlinks once)
	Entries          uint64 // paths of the tree, including "/" and hardlink aliases
	Dirs             uint64
	Files            uint64 // regular files (distinct inodes)
	Symlinks         uint64
	Devices          uint64 // character and block devices, except whiteouts
	Others           uint64 // FIFOs and sockets
	Whiteouts        uint64 // overlay whiteouts shown as chardev 0:0 (xwhiteouts)
	Hardlinks        uint64 // alias entries (paths beyond the first of an inode)
	TotalFileBytes   uint64 // Σ size of regular files (distinct inodes)
	InlineFiles      uint64 // non-empty regular files stored in the image
	InlineBytes      uint64
	ExternalFiles    uint64 // regular files backed by an object (chunk-based)
	ExternalBytes    uint64
	Objects          int // distinct backing objects
}

// Image is a parsed, validated composefs image. Open reads and checks the
// whole tree; afterwards the Image is immutable and safe for concurrent use
// (the tree from Root must be treated as read-only by concurrent users:
// xattr values may share memory between nodes).
type Image struct {
	r       io.ReaderAt
	size    int64
	opts    OpenOptions
	flags   uint32
	version uint32
	sb      rdSuper
	root    *Node
	objects []Object
	stats   ImageStats
	nids    map[*Node]uint64
}

type rdSuper struct {
	rootNid      uint64
	inos         uint64
	buildTime    Timespec
	blocks       uint32
	xattrBlkaddr uint32
	compat       uint32
	incompat     uint32
}

// RawXattr is one xattr entry as stored in an inode.
type RawXattr struct {
	Index    uint8  // e_name_index
	Key      string // full key: prefix of Index + stored name
	Value    []byte
	Shared   bool   // stored in the shared xattr table
	SharedID uint32 // its id, if Shared
}

// RawDirent is one directory entry as stored, including "." and "..".
type RawDirent struct {
	Name     string
	Nid      uint64
	FileType uint8 // 1 REG, 2 DIR, 3 CHR, 4 BLK, 5 FIFO, 6 SOCK, 7 LNK
}

// RawInode is one EROFS inode as stored, before the overlay
// interpretation of §2.15 (no whiteout conversion, no xattr rewriting).
type RawInode struct {
	Nid      uint64
	Offset   int64 // byte offset in the image (nid × 32)
	Format   uint16
	Extended bool
	Layout   uint8 // 0 flat plain, 2 flat inline, 4 chunk based
	Mode     uint32
	Nlink    uint32
	UID, GID uint32
	Size     uint64
	Mtime    Timespec // the superblock build time for compact inodes
	Ino      uint32
	U        uint32 // raw i_u: block address, rdev or chunk format
	Xattrs   []RawXattr
	// Symlink is the target of a symlink.
	Symlink string
	// Data is the inline content of a flat regular file (nil if empty).
	Data []byte
	// Dirents of a directory, in stored order.
	Dirents []RawDirent
	// Redirect is the raw trusted.overlay.redirect value (with its
	// leading '/'); HasRedirect tells whether it is set.
	Redirect    string
	HasRedirect bool
	// HasMetacopy tells whether trusted.overlay.metacopy is set; Metacopy
	// is its digest (nil when the value is empty).
	HasMetacopy bool
	Metacopy    *Digest
	// Extent is the bytes the inode occupies in the inode table (header,
	// xattr body, inline tail).
	Extent int64
}

// Type returns the file type bits of the mode.
func (ri *RawInode) Type() uint32 { return ri.Mode & ModeTypeMask }

// Open parses and validates the composefs image of size bytes in r. It
// reads the whole metadata tree: later calls do not touch r, except Inode.
// Memory and time are linear in size.
func Open(r io.ReaderAt, size int64, opts OpenOptions) (*Image, error) {
	if opts.MaxDepth <= 0 {
		opts.MaxDepth = rdDefaultMaxDepth
	}
	if opts.MaxDepth > rdMaxMaxDepth {
		opts.MaxDepth = rdMaxMaxDepth
	}
	if opts.MaxInodes <= 0 {
		opts.MaxInodes = rdDefaultMaxInodes
	}
	img := &Image{r: r, opts: opts}
	src := &rdSource{r: r, size: size, unreadable: opts.AllowUnreadableFiles}
	if err := img.readHeaders(src, size); err != nil {
		return nil, err
	}
	if img.sb.inos > uint64(opts.MaxInodes) {
		return nil, fmt.Errorf("%w: superblock claims %d inodes, more than the limit of %d (OpenOptions.MaxInodes)", ErrUnsupported, img.sb.inos, opts.MaxInodes)
	}
	src.size = img.size
	b := &rdBuilder{
		img:      img,
		src:      src,
		bud:      rdNewBudget(img.size),
		dirs:     make(map[uint64]bool),
		files:    make(map[uint64]rdPrimary),
		skipped:  make(map[uint64]bool),
		objIndex: make(map[string]int),
	}
	img.nids = make(map[*Node]uint64)
	if err := b.buildRoot(); err != nil {
		return nil, err
	}
	sort.Slice(img.objects, func(i, j int) bool { return img.objects[i].Path < img.objects[j].Path })
	img.stats.Objects = len(img.objects)
	img.stats.ImageSize = img.size
	img.stats.Version = img.version
	img.stats.SuperblockInodes = img.sb.inos
	return img, nil
}

// Root returns the tree as `composefs-info dump` reconstructs it (§2.15).
func (img *Image) Root() *Node { return img.root }

// Lookup finds the node at an absolute path; it does not follow symlinks.
func (img *Image) Lookup(path string) (*Node, error) {
	n := img.root.Lookup(path)
	if n == nil {
		return nil, fmt.Errorf("%s: %w", path, fs.ErrNotExist)
	}
	return n, nil
}

// Objects returns the distinct backing objects, sorted by path (strcmp).
func (img *Image) Objects() []Object { return append([]Object(nil), img.objects...) }

// Version returns composefs_version from the header (0 or 1).
func (img *Image) Version() uint32 { return img.version }

// HasACL reports the header flag: some inode carries a POSIX ACL, so the
// erofs must be mounted without "noacl".
func (img *Image) HasACL() bool { return img.flags&rdFlagHasACL != 0 }

// Stats summarises the image.
func (img *Image) Stats() ImageStats { return img.stats }

// Size returns the image size the superblock covers (blocks × 4096).
func (img *Image) Size() int64 { return img.size }

// RootNid returns the nid of the root directory.
func (img *Image) RootNid() uint64 { return img.sb.rootNid }

// Nid returns the nid of the inode behind a node of Root (for an alias, its
// target's inode).
func (img *Image) Nid(n *Node) (uint64, bool) {
	if n == nil {
		return 0, false
	}
	nid, ok := img.nids[n.Target()]
	return nid, ok
}

// Inode reads and validates one inode afresh from the image: its metadata,
// raw xattrs, symlink target, inline data, dirents, redirect and metacopy.
func (img *Image) Inode(nid uint64) (*RawInode, error) {
	src := &rdSource{r: img.r, size: img.size, unreadable: img.opts.AllowUnreadableFiles}
	budget := rdNewBudget(img.size)
	return src.parseInode(nid, &img.sb, &budget)
}

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

// rdSource reads bounds-checked byte ranges of the image through a small
// direct-mapped block cache.
type rdSource struct {
	r     io.ReaderAt
	size  int64
	slots [rdCacheSlots]*rdCacheBlock
	// unreadable is OpenOptions.AllowUnreadableFiles.
	unreadable bool
}

const rdCacheSlots = 64

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

// parseInode reads and validates one inode and its data.
func (s *rdSource) parseInode(nid uint64, sb *rdSuper, bud *rdBudget) (*RawInode, error) {
	le := binary.LittleEndian
	if nid > uint64(s.size)>>rdSlotBits {
		return nil, rdCorrupt(nid, "nid out of range")
	}
	off := int64(nid << rdSlotBits)
	if off < rdInodeStart || off+rdCompactSize > s.size {
		return nil, rdCorrupt(nid, "nid out of range (offset %d, image %d bytes)", off, s.size)
	}
	var h [rdExtendedSize]byte
	if err := s.readAt(h[:rdCompactSize], off); err != nil {
		return nil, fmt.Errorf("nid %d: %w", nid, err)
	}
	ri := &RawInode{Nid: nid, Offset: off}
	ri.Format = le.Uint16(h[0:])
	if ri.Format&^0xf != 0 {
		return nil, fmt.Errorf("%w: nid %d: unknown i_format bits %#x", ErrUnsupported, nid, ri.Format)
	}
	ri.Extended = ri.Format&1 != 0
	ri.Layout = uint8(ri.Format >> 1 & 7)
	if ri.Layout != rdLayoutPlain && ri.Layout != rdLayoutInline && ri.Layout != rdLayoutChunk {
		return nil, fmt.Errorf("%w: nid %d: data layout %d (compressed?) is not used by composefs", ErrUnsupported, nid, ri.Layout)
	}
	icount := le.Uint16(h[2:])
	ri.Mode = uint32(le.Uint16(h[4:]))
	isize := int64(rdCompactSize)
	if ri.Extended {
		isize = rdExtendedSize
		if err := s.readAt(h[rdCompactSize:], off+rdCompactSize); err != nil {
			return nil, fmt.Errorf("nid %d: extended inode: %w", nid, err)
		}
		ri.Size = le.Uint64(h[8:])
		ri.U = le.Uint32(h[16:])
		ri.Ino = le.Uint32(h[20:])
		ri.UID = le.Uint32(h[24:])
		ri.GID = le.Uint32(h[28:])
		ri.Mtime = Timespec{Sec: int64(le.Uint64(h[32:])), Nsec: le.Uint32(h[40:])}
		ri.Nlink = le.Uint32(h[44:])
	} else {
		ri.Nlink = uint32(le.Uint16(h[6:]))
		ri.Size = uint64(le.Uint32(h[8:]))
		if r := le.Uint32(h[12:]); r != 0 {
			// Newer kernels read this as an mtime offset from build_time;
			// composefs writes 0. Refuse the ambiguity.
			return nil, fmt.Errorf("%w: nid %d: compact inode with non-zero i_reserved %#x", ErrUnsupported, nid, r)
		}
		ri.U = le.Uint32(h[16:])
		ri.Ino = le.Uint32(h[20:])
		ri.UID = uint32(le.Uint16(h[24:]))
		ri.GID = uint32(le.Uint16(h[26:]))
		ri.Mtime = sb.buildTime
	}
	typ := ri.Type()
	switch typ {
	case ModeRegular, ModeDir, ModeSymlink, ModeChar, ModeBlock, ModeFIFO, ModeSocket:
	default:
		return nil, rdCorrupt(nid, "invalid file type in mode %#o", ri.Mode)
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
		if err := s.parseXattrs(ri, off+isize, xsize, sb, bud); err != nil {
			return nil, err
		}
	}

	// Data.
	tail := int64(0)
	var err error
	switch typ {
	case ModeDir:
		tail, err = s.parseDir(ri, tailOff, bud)
	case ModeRegular:
		tail, err = s.parseRegular(ri, tailOff, bud)
	case ModeSymlink:
		tail, err = s.parseSymlink(ri, tailOff, bud)
	default:
		if ri.Layout != rdLayoutPlain {
			err = rdCorrupt(nid, "special file %#o with data layout %d", ri.Mode, ri.Layout)
		}
	}
	if err != nil {
		return nil, err
	}
	ri.Extent = isize + xsize + tail
	if err := s.check(off, ri.Extent); err != nil {
		return nil, fmt.Errorf("nid %d: %w", nid, err)
	}
	if err := rdSpend(&bud.meta, ri.Extent, "inode bytes", nid); err != nil {
		return nil, err
	}
	if err := ri.checkOverlayXattrs(); err != nil {
		return nil, err
	}
	return ri, nil
}

// inlineTail checks an inline tail: non-empty and not crossing a block.
func (s *rdSource) inlineTail(nid uint64, off, n int64) ([]byte, error) {
	if n <= 0 || n >= rdBlk {
		return nil, rdCorrupt(nid, "inline tail of %d bytes", n)
	}
	if off/rdBlk != (off+n-1)/rdBlk {
		return nil, rdCorrupt(nid, "inline tail at %d (+%d) crosses a block boundary", off, n)
	}
	b, err := s.bytes(off, n)
	if err != nil {
		return nil, fmt.Errorf("nid %d: inline tail: %w", nid, err)
	}
	return b, nil
}

// dataBlocks reads n full blocks starting at block blkaddr.
func (s *rdSource) dataBlocks(ri *RawInode, blkaddr uint32, n int64, bud *rdBudget) ([]byte, error) {
	if n == 0 {
		return nil, nil
	}
	if blkaddr == 0 {
		return nil, rdCorrupt(ri.Nid, "data at block 0")
	}
	start := int64(blkaddr) * rdBlk
	if n > s.size/rdBlk {
		return nil, rdCorrupt(ri.Nid, "%d data blocks in an image of %d bytes", n, s.size)
	}
	if err := s.check(start, n*rdBlk); err != nil {
		return nil, fmt.Errorf("nid %d: data blocks %d+%d: %w", ri.Nid, blkaddr, n, err)
	}
	if err := rdSpend(&bud.data, n*rdBlk, "data blocks", ri.Nid); err != nil {
		return nil, err
	}
	return s.bytes(start, n*rdBlk)
}

func (s *rdSource) parseDir(ri *RawInode, tailOff int64, bud *rdBudget) (int64, error) {
	nid := ri.Nid
	if ri.Layout == rdLayoutChunk {
		return 0, rdCorrupt(nid, "chunk-based directory")
	}
	if ri.Size == 0 || ri.Size > uint64(s.size) {
		return 0, rdCorrupt(nid, "directory size %d", ri.Size)
	}
	size := int64(ri.Size)
	full, tail, err := ri.blockSplit("directory")
	if err != nil {
		return 0, err
	}
	blocks, err := s.dataBlocks(ri, ri.U, full, bud)
	if err != nil {
		return 0, err
	}
	var prev string
	first := true
	for i := int64(0); i < full; i++ {
		chunk := blocks[i*rdBlk : (i+1)*rdBlk]
		if ri.Layout == rdLayoutPlain && i == full-1 && size%rdBlk != 0 {
			chunk = chunk[:size%rdBlk]
		}
		if err := ri.parseDirents(chunk, &prev, &first); err != nil {
			return 0, err
		}
	}
	if tail > 0 {
		t, err := s.inlineTail(nid, tailOff, tail)
		if err != nil {
			return 0, err
		}
		if err := ri.parseDirents(t, &prev, &first); err != nil {
			return 0, err
		}
	}
	var dot, dotdot bool
	for _, d := range ri.Dirents {
		switch d.Name {
		case ".":
			dot = true
			if d.Nid != nid {
				return 0, rdCorrupt(nid, "\".\" points at nid %d", d.Nid)
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

// parseDirents decodes one directory chunk (a block or the inline tail),
// checking that names are valid and strictly increasing across chunks.
func (ri *RawInode) parseDirents(chunk []byte, prev *string, first *bool) error {
	le := binary.LittleEndian
	nid := ri.Nid
	if len(chunk) < rdDirentSize {
		return rdCorrupt(nid, "directory chunk of %d bytes", len(chunk))
	}
	nameoff0 := int(le.Uint16(chunk[8:]))
	if nameoff0 < rdDirentSize || nameoff0%rdDirentSize != 0 || nameoff0 >= len(chunk) {
		return rdCorrupt(nid, "first dirent nameoff %d in a %d-byte chunk", nameoff0, len(chunk))
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
			for j := start; j < len(chunk); j++ {
				if chunk[j] == 0 {
					end = j
					break
				}
			}
		}
		if start < nameoff0 || end <= start || end > len(chunk) {
			return rdCorrupt(nid, "dirent %d: name offsets %d..%d invalid in a %d-byte chunk", i, start, end, len(chunk))
		}
		name := chunk[start:end]
		if len(name) > MaxNameLen {
			return rdCorrupt(nid, "dirent name of %d bytes", len(name))
		}
		for _, c := range name {
			if c == 0 || c == '/' {
				return rdCorrupt(nid, "dirent name %q contains NUL or '/'", truncateForError(string(name)))
			}
		}
		sname := string(name)
		if !*first && sname <= *prev {
			return rdCorrupt(nid, "dirent %q not after %q (unsorted or duplicate names)", truncateForError(sname), truncateForError(*prev))
		}
		*first = false
		*prev = sname
		ft := d[10]
		if ft > 7 {
			return rdCorrupt(nid, "dirent %q: file type %d", truncateForError(sname), ft)
		}
		ri.Dirents = append(ri.Dirents, RawDirent{Name: sname, Nid: le.Uint64(d[0:]), FileType: ft})
	}
	return nil
}

func (s *rdSource) parseRegular(ri *RawInode, tailOff int64, bud *rdBudget) (int64, error) {
	nid := ri.Nid
	switch ri.Layout {
	case rdLayoutChunk:
		if ri.Size == 0 {
			return 0, rdCorrupt(nid, "empty chunk-based file")
		}
		// i_u holds the chunk format in its low 16 bits; the kernel
		// ignores the high 16, which composefs leaves 0 except for a map
		// that does not fit beside the inode (below).
		if ri.U&0xffe0 != 0 || (ri.U&^0x1f != 0 && !s.unreadable) {
			return 0, fmt.Errorf("%w: nid %d: chunk format %#x (only 4-byte block maps are written by composefs)", ErrUnsupported, nid, ri.U)
		}
		chunkBits := rdBlkBits + uint(ri.U&0x1f)
		count := (ri.Size-1)>>chunkBits + 1
		if count > rdMaxChunks {
			return 0, rdCorrupt(nid, "%d chunks for size %d", count, ri.Size)
		}
		mapLen := int64(count) * 4
		if tailOff/rdBlk != (tailOff+mapLen-1)/rdBlk {
			// mkcomposefs puts a map that does not fit beside its inode
			// (files over ~8.7 PB) in a block of holes the inode does not
			// point at; the kernel reads the map from here, where other
			// inodes or padding lie, and serves whatever blocks those
			// bytes name (zeros: the image's first block) as file data.
			if !s.unreadable {
				return 0, fmt.Errorf("%w: nid %d: a %d-byte file whose %d-byte chunk map does not fit beside its inode (the kernel would take the bytes after the inode for its map)", ErrUnsupported, nid, ri.Size, mapLen)
			}
			if err := s.check(tailOff, mapLen); err != nil {
				return 0, fmt.Errorf("nid %d: chunk map: %w", nid, err)
			}
			return 0, nil // not part of this inode; composefs-info does not read it either
		}
		idx, err := s.bytes(tailOff, mapLen)
		if err != nil {
			return 0, fmt.Errorf("nid %d: chunk map: %w", nid, err)
		}
		for i := 0; i < len(idx); i += 4 {
			if binary.LittleEndian.Uint32(idx[i:]) != rdNullAddr {
				return 0, rdCorrupt(nid, "chunk %d is not a hole (composefs files have no data in the image)", i/4)
			}
		}
		return int64(count) * 4, nil
	case rdLayoutPlain, rdLayoutInline:
		if ri.Size == 0 {
			if ri.Layout != rdLayoutPlain {
				return 0, rdCorrupt(nid, "empty file with inline layout")
			}
			return 0, nil
		}
		if ri.Size > MaxInlineContent {
			return 0, rdCorrupt(nid, "inline file of %d bytes (composefs inlines at most %d)", ri.Size, MaxInlineContent)
		}
		size := int64(ri.Size)
		full, tail, err := ri.blockSplit("file")
		if err != nil {
			return 0, err
		}
		data, err := s.dataBlocks(ri, ri.U, full, bud)
		if err != nil {
			return 0, err
		}
		if ri.Layout == rdLayoutPlain {
			data = data[:size]
		}
		if tail > 0 {
			t, err := s.inlineTail(nid, tailOff, tail)
			if err != nil {
				return 0, err
			}
			data = append(data, t...)
		}
		ri.Data = data
		return tail, nil
	}
	return 0, rdCorrupt(nid, "layout %d", ri.Layout)
}

func (s *rdSource) parseSymlink(ri *RawInode, tailOff int64, bud *rdBudget) (int64, error) {
	nid := ri.Nid
	if ri.Size == 0 || ri.Size > MaxSymlinkLen {
		return 0, rdCorrupt(nid, "symlink target of %d bytes", ri.Size)
	}
	size := int64(ri.Size)
	var target []byte
	var tail int64
	switch ri.Layout {
	case rdLayoutInline:
		t, err := s.inlineTail(nid, tailOff, size)
		if err != nil {
			return 0, err
		}
		target, tail = t, size
	case rdLayoutPlain:
		b, err := s.dataBlocks(ri, ri.U, 1, bud)
		if err != nil {
			return 0, err
		}
		target = b[:size]
	default:
		return 0, rdCorrupt(nid, "chunk-based symlink")
	}
	for _, c := range target {
		if c == 0 {
			return 0, rdCorrupt(nid, "symlink target contains NUL")
		}
	}
	ri.Symlink = string(target)
	return tail, nil
}

// parseXattrs decodes the inode xattr body at off (xsize bytes): inline
// entries first, then the shared ones, as the C reader orders them.
func (s *rdSource) parseXattrs(ri *RawInode, off, xsize int64, sb *rdSuper, bud *rdBudget) error {
	le := binary.LittleEndian
	nid := ri.Nid
	body, err := s.bytes(off, xsize)
	if err != nil {
		return fmt.Errorf("nid %d: xattrs: %w", nid, err)
	}
	nShared := int64(body[4])
	pos := 12 + 4*nShared
	if pos > xsize {
		return rdCorrupt(nid, "%d shared xattrs do not fit in a %d-byte xattr body", nShared, xsize)
	}
	for pos < xsize {
		x, esize, err := rdParseXattrEntry(body[pos:], nid)
		if err != nil {
			return err
		}
		if err := rdSpend(&bud.xattr, int64(len(x.Key)+len(x.Value)), "xattr bytes", nid); err != nil {
			return err
		}
		ri.Xattrs = append(ri.Xattrs, x)
		pos += esize
	}
	base := int64(sb.xattrBlkaddr) * rdBlk
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
		if err := rdSpend(&bud.xattr, elen, "xattr bytes", nid); err != nil {
			return err
		}
		eb, err := s.bytes(eoff, elen)
		if err != nil {
			return err
		}
		x, _, err := rdParseXattrEntry(eb, nid)
		if err != nil {
			return fmt.Errorf("shared xattr %d: %w", id, err)
		}
		x.Shared, x.SharedID = true, id
		ri.Xattrs = append(ri.Xattrs, x)
	}
	// Keys are unique per inode.
	if len(ri.Xattrs) > 1 {
		keys := make([]string, len(ri.Xattrs))
		for i, x := range ri.Xattrs {
			keys[i] = x.Key
		}
		sort.Strings(keys)
		for i := 1; i < len(keys); i++ {
			if keys[i] == keys[i-1] {
				return rdCorrupt(nid, "duplicate xattr %q", truncateForError(keys[i]))
			}
		}
	}
	return nil
}

// rdParseXattrEntry decodes one entry at the start of b and returns it with
// its padded size.
func rdParseXattrEntry(b []byte, nid uint64) (RawXattr, int64, error) {
	if len(b) < 4 {
		return RawXattr{}, 0, rdCorrupt(nid, "truncated xattr entry")
	}
	nameLen := int64(b[0])
	index := b[1]
	vlen := int64(binary.LittleEndian.Uint16(b[2:]))
	end := 4 + nameLen + vlen
	if end > int64(len(b)) {
		return RawXattr{}, 0, rdCorrupt(nid, "xattr entry of %d bytes overruns its area (%d bytes)", end, len(b))
	}
	if int(index) >= len(rdXattrPrefixes) {
		return RawXattr{}, 0, rdCorrupt(nid, "xattr name index %d", index)
	}
	name := b[4 : 4+nameLen]
	if index == 0 && nameLen == 0 {
		return RawXattr{}, 0, rdCorrupt(nid, "xattr with an empty name")
	}
	for _, c := range name {
		if c == 0 {
			return RawXattr{}, 0, rdCorrupt(nid, "xattr name contains NUL")
		}
	}
	x := RawXattr{
		Index: index,
		Key:   rdXattrPrefixes[index] + string(name),
		Value: b[4+nameLen : end : end],
	}
	return x, (end + 3) &^ 3, nil
}

// checkOverlayXattrs validates the composefs overlay xattrs of a raw inode.
func (ri *RawInode) checkOverlayXattrs() error {
	nid := ri.Nid
	for _, x := range ri.Xattrs {
		switch x.Key {
		case rdXattrRedirect:
			ri.Redirect, ri.HasRedirect = string(x.Value), true
		case rdXattrMetacopy:
			ri.HasMetacopy = true
			switch len(x.Value) {
			case 0:
			case 4 + DigestSize:
				if x.Value[0] != 0 || x.Value[1] != 4+DigestSize || x.Value[2] != 0 || x.Value[3] != 1 {
					return rdCorrupt(nid, "metacopy header % x, want 00 24 00 01 (sha256)", x.Value[:4])
				}
				var d Digest
				copy(d[:], x.Value[4:])
				ri.Metacopy = &d
			default:
				return rdCorrupt(nid, "metacopy value of %d bytes (want 0 or 36)", len(x.Value))
			}
		}
	}
	if ri.Type() != ModeRegular {
		return nil
	}
	if (ri.HasRedirect || ri.HasMetacopy) && ri.Layout != rdLayoutChunk {
		return rdCorrupt(nid, "file with inline data carries overlay redirect/metacopy")
	}
	if ri.HasRedirect {
		if strings.IndexByte(ri.Redirect, 0) >= 0 {
			return rdCorrupt(nid, "redirect contains NUL")
		}
		if strings.TrimPrefix(ri.Redirect, "/") == "" {
			return rdCorrupt(nid, "empty redirect")
		}
	}
	return nil
}

// blockSplit returns how many full data blocks an inode of a flat layout
// has and how long its inline tail is; an inline layout with an empty tail
// is corrupt.
func (ri *RawInode) blockSplit(what string) (full, tail int64, err error) {
	size := int64(ri.Size)
	if ri.Layout != rdLayoutInline {
		return (size + rdBlk - 1) / rdBlk, 0, nil
	}
	full, tail = size/rdBlk, size%rdBlk
	if tail == 0 {
		return 0, 0, rdCorrupt(ri.Nid, "inline %s with an empty tail (size %d)", what, size)
	}
	return full, tail, nil
}

// rdPrimary is the first node of a non-directory inode.
type rdPrimary struct {
	node    *Node
	rawType uint32
}

type rdBuilder struct {
	img      *Image
	src      *rdSource
	bud      rdBudget
	dirs     map[uint64]bool // directories seen (each may appear once)
	files    map[uint64]rdPrimary
	skipped  map[uint64]bool // chardev 0:0 whiteouts already seen
	objIndex map[string]int
}

func (b *rdBuilder) buildRoot() error {
	img := b.img
	nid := img.sb.rootNid
	ri, err := b.src.parseInode(nid, &img.sb, &b.bud)
	if err != nil {
		return fmt.Errorf("root: %w", err)
	}
	if ri.Type() != ModeDir {
		return fmt.Errorf("%w: root nid %d is not a directory (mode %#o)", ErrCorrupt, nid, ri.Mode)
	}
	root, err := b.node(ri, "", nil)
	if err != nil {
		return err
	}
	img.root = root
	b.dirs[nid] = true
	return b.dir(root, ri, nid, 0)
}

func rdTypeOfDirent(ft uint8) uint32 {
	switch ft {
	case 1:
		return ModeRegular
	case 2:
		return ModeDir
	case 3:
		return ModeChar
	case 4:
		return ModeBlock
	case 5:
		return ModeFIFO
	case 6:
		return ModeSocket
	case 7:
		return ModeSymlink
	}
	return 0
}

// dir adds the children of directory node (raw inode ri, nid dnid).
func (b *rdBuilder) dir(node *Node, ri *RawInode, parentNid uint64, depth int) error {
	if depth > b.img.opts.MaxDepth {
		return fmt.Errorf("%w: %s: directories nested deeper than %d", ErrUnsupported, node.Path(), b.img.opts.MaxDepth)
	}
	for _, de := range ri.Dirents {
		switch de.Name {
		case ".":
			continue
		case "..":
			if de.Nid != parentNid {
				return fmt.Errorf("%w: %s (nid %d): \"..\" points at nid %d, not the parent %d", ErrCorrupt, node.Path(), ri.Nid, de.Nid, parentNid)
			}
			continue
		}
		child, err := b.entry(node, ri.Nid, de, depth)
		if err != nil {
			return err
		}
		if child != nil {
			node.Children = append(node.Children, child)
		}
	}
	return nil
}

func (b *rdBuilder) childPath(parent *Node, name string) string {
	if parent.Parent == nil {
		return "/" + name
	}
	return parent.Path() + "/" + name
}

func (b *rdBuilder) entry(parent *Node, parentNid uint64, de RawDirent, depth int) (*Node, error) {
	img := b.img
	if p, ok := b.files[de.Nid]; ok {
		if rdTypeOfDirent(de.FileType) != p.rawType {
			return nil, fmt.Errorf("%w: %s: dirent type %d does not match nid %d", ErrCorrupt, b.childPath(parent, de.Name), de.FileType, de.Nid)
		}
		img.stats.Hardlinks++
		img.stats.Entries++
		return &Node{Name: de.Name, Parent: parent, LinkTo: p.node}, nil
	}
	if b.dirs[de.Nid] {
		return nil, fmt.Errorf("%w: %s: directory nid %d is reachable twice (directory loop or hardlinked directory)", ErrCorrupt, b.childPath(parent, de.Name), de.Nid)
	}
	if b.skipped[de.Nid] {
		return nil, nil
	}
	ri, err := b.src.parseInode(de.Nid, &img.sb, &b.bud)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", b.childPath(parent, de.Name), err)
	}
	if rdTypeOfDirent(de.FileType) != ri.Type() {
		return nil, fmt.Errorf("%w: %s: dirent type %d does not match the mode %#o of nid %d", ErrCorrupt, b.childPath(parent, de.Name), de.FileType, ri.Mode, de.Nid)
	}
	if ri.Type() == ModeChar && ri.U == 0 {
		// A real overlay whiteout (the 00..ff root entries): hidden, as
		// composefs-info does.
		b.skipped[de.Nid] = true
		return nil, nil
	}
	n, err := b.node(ri, de.Name, parent)
	if err != nil {
		return nil, err
	}
	if ri.Type() == ModeDir {
		b.dirs[de.Nid] = true
		if err := b.dir(n, ri, parentNid, depth+1); err != nil {
			return nil, err
		}
	} else {
		b.files[de.Nid] = rdPrimary{node: n, rawType: ri.Type()}
	}
	return n, nil
}

// node turns a raw inode into a Node as the C reader does (§2.15) and
// applies the redirect policy.
func (b *rdBuilder) node(ri *RawInode, name string, parent *Node) (*Node, error) {
	img := b.img
	n := &Node{
		Name:   name,
		Parent: parent,
		Mode:   ri.Mode,
		Nlink:  ri.Nlink,
		UID:    ri.UID,
		GID:    ri.GID,
		Size:   ri.Size,
		Mtime:  ri.Mtime,
	}
	typ := ri.Type()
	if typ == ModeChar || typ == ModeBlock {
		n.Rdev = uint64(ri.U)
	}
	whiteout := false
	for _, x := range ri.Xattrs {
		switch {
		case x.Key == rdXattrRedirect, x.Key == rdXattrMetacopy:
			// Interpreted below for regular files; dropped otherwise.
		case x.Key == rdXattrEscWhiteout && typ == ModeRegular:
			whiteout = true
		case x.Key == rdXattrEscWhiteouts, x.Key == rdXattrUserWhiteout, x.Key == rdXattrUserWhiteouts:
		case strings.HasPrefix(x.Key, rdOverlayEscPrefix):
			n.Xattrs = append(n.Xattrs, Xattr{Key: rdOverlayPrefix + x.Key[len(rdOverlayEscPrefix):], Value: x.Value})
		case strings.HasPrefix(x.Key, rdOverlayPrefix):
			// An unescaped overlay xattr (opaque=y, …): not user data.
		default:
			n.Xattrs = append(n.Xattrs, Xattr{Key: x.Key, Value: x.Value})
		}
	}
	st := &img.stats
	st.Entries++
	st.Inodes++
	if st.Inodes > uint64(img.opts.MaxInodes) {
		return nil, fmt.Errorf("%w: more than the limit of %d inodes (OpenOptions.MaxInodes)", ErrUnsupported, img.opts.MaxInodes)
	}
	img.nids[n] = ri.Nid
	switch typ {
	case ModeSymlink:
		n.Payload = ri.Symlink
		st.Symlinks++
	case ModeDir:
		st.Dirs++
	case ModeChar, ModeBlock:
		st.Devices++
	case ModeFIFO, ModeSocket:
		st.Others++
	case ModeRegular:
		if whiteout {
			n.Mode = n.Mode&^ModeTypeMask | ModeChar
			n.Rdev, n.Size = 0, 0
			st.Whiteouts++
			return n, nil
		}
		st.Files++
		st.TotalFileBytes += ri.Size
		if ri.Layout != rdLayoutChunk {
			if len(ri.Data) > 0 {
				n.Content = ri.Data
				st.InlineFiles++
				st.InlineBytes += ri.Size
			}
			return n, nil
		}
		st.ExternalFiles++
		st.ExternalBytes += ri.Size
		n.Digest = ri.Metacopy
		if !ri.HasRedirect && !b.img.opts.AllowForeignRedirects {
			// Overlay would look the file up by its own path in the data
			// layers, which an object store never holds: it reads EIO.
			return nil, fmt.Errorf("%w: %s (nid %d): external file without a redirect to an object", ErrForeignRedirect, n.Path(), ri.Nid)
		}
		if ri.HasRedirect {
			n.Payload = strings.TrimPrefix(ri.Redirect, "/")
			if err := b.object(n, ri); err != nil {
				return nil, err
			}
		}
	}
	return n, nil
}

// object applies the redirect policy and records the backing object.
func (b *rdBuilder) object(n *Node, ri *RawInode) error {
	img := b.img
	d, perr := ParseObjectPath(n.Payload)
	if !img.opts.AllowForeignRedirects {
		if perr != nil || !strings.HasPrefix(ri.Redirect, "/") || strings.HasPrefix(ri.Redirect, "//") {
			return fmt.Errorf("%w: %s (nid %d): redirect %q", ErrForeignRedirect, n.Path(), ri.Nid, truncateForError(ri.Redirect))
		}
		if ri.Metacopy != nil && *ri.Metacopy != d {
			return fmt.Errorf("%w: %s (nid %d): redirect %s, metacopy digest %s", ErrDigestMismatch, n.Path(), ri.Nid, n.Payload, ri.Metacopy)
		}
	}
	if i, ok := b.objIndex[n.Payload]; ok {
		if !img.opts.AllowForeignRedirects && img.objects[i].Size != n.Size {
			return fmt.Errorf("%w: %s (nid %d): object %s referenced with sizes %d and %d", ErrCorrupt, n.Path(), ri.Nid, n.Payload, img.objects[i].Size, n.Size)
		}
		return nil
	}
	o := Object{Path: n.Payload, Size: n.Size}
	if perr == nil {
		o.Digest = d
	}
	b.objIndex[n.Payload] = len(img.objects)
	img.objects = append(img.objects, o)
	return nil
}
