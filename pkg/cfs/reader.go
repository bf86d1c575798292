package cfs

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
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
	// ErrTooLarge: the image's tree would take more memory than
	// OpenOptions.MaxMemory allows.
	ErrTooLarge = errors.New("composefs image too large for the memory limit")
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
	// MaxMemory bounds the memory the tree of the image takes, with what
	// CheckCanonical takes to write it again, as estimated while the tree
	// is built (ImageStats.Memory; its real peak stays below): an image
	// whose tree would take more is refused (ErrTooLarge) as soon as the
	// walk reaches the limit, so a hostile image with many small entries
	// (hard links, compact inodes) cannot exhaust the memory within its
	// size. 0 means none.
	MaxMemory int64
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
	// Memory is the estimated memory of the tree and of checking it
	// canonical (what OpenOptions.MaxMemory bounds): an upper bound of
	// the peak heap that Open and CheckCanonical take.
	Memory int64
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

// Open parses and validates the composefs image of size bytes in r and
// builds its tree. It reads the whole metadata tree: later calls do not
// touch r, except Inode. Memory and time are linear in size.
func Open(r io.ReaderAt, size int64, opts OpenOptions) (*Image, error) {
	img, src, err := openHeaders(r, size, opts)
	if err != nil {
		return nil, err
	}
	w := newWalk(img, src, newTree(img), true)
	if err := w.run(); err != nil {
		return nil, err
	}
	img.objects = w.takeObjects()
	img.finishStats()
	return img, nil
}

// openHeaders checks the headers and prepares an Image and its source.
func openHeaders(r io.ReaderAt, size int64, opts OpenOptions) (*Image, *rdSource, error) {
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
		return nil, nil, err
	}
	if img.sb.inos > uint64(opts.MaxInodes) {
		return nil, nil, fmt.Errorf("%w: superblock claims %d inodes, more than the limit of %d (OpenOptions.MaxInodes)", ErrUnsupported, img.sb.inos, opts.MaxInodes)
	}
	src.size = img.size
	return img, src, nil
}

func (img *Image) finishStats() {
	img.stats.Objects = len(img.objects)
	img.stats.ImageSize = img.size
	img.stats.Version = img.version
	img.stats.SuperblockInodes = img.sb.inos
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
// target's inode); n must be a node of this image's tree.
func (img *Image) Nid(n *Node) (uint64, bool) {
	if n == nil {
		return 0, false
	}
	t := n.Target()
	return t.nid, t.nid != 0
}

// Inode reads and validates one inode afresh from the image: its metadata,
// raw xattrs, symlink target, inline data, dirents, redirect and metacopy.
func (img *Image) Inode(nid uint64) (*RawInode, error) {
	src := &rdSource{r: img.r, size: img.size, unreadable: img.opts.AllowUnreadableFiles}
	ri, err := newParser(src, &img.sb).parse(nid, 0)
	if err != nil {
		return nil, err
	}
	return ri.raw(), nil
}
