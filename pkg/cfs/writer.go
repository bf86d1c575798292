package cfs

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"math/bits"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// On-disk constants of composefs images and EROFS.
const (
	blkSize         = 4096
	blkBits         = 12
	slotSize        = 32
	superOffset     = 1024
	superSize       = 128
	inodesStart     = superOffset + superSize
	compactSize     = 32
	extendedSize    = 64
	xattrHeaderSize = 12
	direntSize      = 12
	maxSharedRefs   = 128
	maxChunkBits    = blkBits + 31

	ComposefsMagic       = 0xd078629a
	ComposefsHeaderVer   = 1 // LCFS_EROFS_VERSION
	ErofsMagic           = 0xe0f5e1e2
	ComposefsFlagHasACL  = 1
	erofsCompatMtime     = 0x2
	erofsCompatXattrFilt = 0x4
	erofsXattrFilterSeed = 0x25bbe08f

	layoutFlatPlain  = 0
	layoutFlatInline = 2
	layoutChunkBased = 4

	// MaxFormatVersion is the newest composefs format version written.
	MaxFormatVersion = 1
)

// Overlay xattrs written by composefs.
const (
	xattrTrustedOverlay = "trusted.overlay."
	xattrEscapedPrefix  = "trusted.overlay.overlay."
	xattrMetacopy       = "trusted.overlay.metacopy"
	xattrRedirect       = "trusted.overlay.redirect"
	xattrOpaque         = "trusted.overlay.opaque"
	xattrACLAccess      = "system.posix_acl_access"
	xattrACLDefault     = "system.posix_acl_default"
)

// WriteOptions select the composefs format version, as mkcomposefs's
// --min-version and --max-version: the image is written at MinVersion,
// raised to 1 when the tree has whiteouts and MaxVersion allows it.
type WriteOptions struct {
	MinVersion int
	MaxVersion int
}

// DefaultWriteOptions are mkcomposefs's defaults: versions 0 to 1.
func DefaultWriteOptions() WriteOptions { return WriteOptions{MinVersion: 0, MaxVersion: 1} }

// ErrInvalidTree is wrapped by errors about a tree that cannot be written.
var ErrInvalidTree = errors.New("invalid composefs tree")

// WriteImage writes the composefs image of the tree at root to w and returns
// its fs-verity digest. The bytes are identical to mkcomposefs 1.0.8's for
// the same tree and options. The tree is not modified.
func WriteImage(w io.Writer, root *Node, opts WriteOptions) (Digest, error) {
	l, err := layoutImage(root, opts)
	if err != nil {
		return Digest{}, err
	}
	h := NewVerityHash()
	bw := bufio.NewWriterSize(io.MultiWriter(w, h), 256*1024)
	e := &emitter{w: bw}
	l.emit(e)
	if e.err == nil {
		e.err = bw.Flush()
	}
	if e.err != nil {
		return Digest{}, fmt.Errorf("writing composefs image: %w", e.err)
	}
	if e.n != int64(l.blocks)*blkSize {
		return Digest{}, fmt.Errorf("internal error: wrote %d bytes, layout says %d", e.n, int64(l.blocks)*blkSize)
	}
	return h.Digest(), nil
}

// WriteImageFile writes the image atomically to path (a temporary file in the
// same directory, fsynced, then renamed) and returns its fs-verity digest.
func WriteImageFile(path string, root *Node, opts WriteOptions) (Digest, error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return Digest{}, fmt.Errorf("creating image file: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	d, err := WriteImage(f, root, opts)
	if err != nil {
		return Digest{}, err
	}
	if err := f.Chmod(0o644); err != nil {
		return Digest{}, fmt.Errorf("writing image %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return Digest{}, fmt.Errorf("writing image %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return Digest{}, fmt.Errorf("writing image %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return Digest{}, fmt.Errorf("writing image %s: %w", path, err)
	}
	ok = true
	return d, nil
}

// inode is the writer's working copy of one inode.
type inode struct {
	parent  *inode
	mode    uint32
	nlink   uint32
	uid     uint32
	gid     uint32
	rdev    uint64
	size    uint64
	mtime   Timespec
	payload string
	content []byte
	digest  *Digest
	xattrs  []Xattr
	entries []dirent // directories: sorted, with "." and ".."

	// Layout.
	ino        uint32
	compact    bool
	shared     []uint32 // shared xattr ids, in key order
	inline     []Xattr
	filter     uint32
	xattrSize  int
	nBlocks    uint64
	tail       int
	offset     uint64 // byte offset of the inode = nid * 32
	blkaddr    uint32
	chunkBits  uint
	chunkCount uint64
	external   bool // regular file backed by an object (chunk-based hole)
}

type dirent struct {
	name   string
	target *inode
	alias  bool // a hardlink, "." or "..": not a tree edge
}

func (in *inode) typ() uint32 { return in.mode & ModeTypeMask }

type sharedXattr struct {
	key    string
	value  []byte
	count  int
	offset uint64 // in the shared table
}

type imageLayout struct {
	version    int
	inodes     []*inode // BFS order
	minMtime   Timespec
	hasACL     bool
	shared     []*sharedXattr
	sharedSize uint64
	inodesEnd  uint64
	dataStart  uint64
	blocks     uint64
}

// layoutImage converts, rewrites and places the tree (§2.14 of the format).
func layoutImage(root *Node, opts WriteOptions) (*imageLayout, error) {
	if root == nil || !root.IsDir() {
		return nil, fmt.Errorf("%w: the root must be a directory", ErrInvalidTree)
	}
	if opts.MinVersion < 0 || opts.MinVersion > MaxFormatVersion || opts.MaxVersion < 0 || opts.MaxVersion > MaxFormatVersion {
		return nil, fmt.Errorf("%w: format versions must be 0..%d (got min %d, max %d)", ErrInvalidTree, MaxFormatVersion, opts.MinVersion, opts.MaxVersion)
	}
	l := &imageLayout{version: opts.MinVersion}
	maxVersion := max(opts.MaxVersion, opts.MinVersion)

	conv := converter{byNode: aliasTargets(root)}
	r, err := conv.convert(root, nil)
	if err != nil {
		return nil, err
	}
	if err := conv.resolveAliases(); err != nil {
		return nil, err
	}
	if l.version < 1 && maxVersion >= 1 && conv.hasWhiteout {
		l.version = 1
	}

	rewriteOverlay(r, l.version)
	addRootWhiteouts(r)
	l.bfs(r)
	l.shareXattrs()
	if err := l.place(); err != nil {
		return nil, err
	}
	return l, nil
}

type converter struct {
	byNode      map[*Node]*inode
	aliases     []aliasEntry
	hasWhiteout bool
	slab        []inode
}

func (c *converter) newInode() *inode {
	if len(c.slab) == 0 {
		c.slab = make([]inode, 256)
	}
	in := &c.slab[0]
	c.slab = c.slab[1:]
	return in
}

// aliasTargets returns the nodes hardlink aliases lead to (chains
// followed), as keys of the map that will hold their inodes.
func aliasTargets(root *Node) map[*Node]*inode {
	m := map[*Node]*inode{}
	var walk func(n *Node)
	walk = func(n *Node) {
		for _, c := range n.Children {
			if c.LinkTo != nil {
				if t, err := followLinks(c); err == nil {
					m[t] = nil
				}
			} else if c.IsDir() {
				walk(c)
			}
		}
	}
	if root != nil && root.IsDir() {
		walk(root)
	}
	return m
}

// aliasEntry is a hardlink entry: the alias node and where it sits.
type aliasEntry struct {
	node   *Node
	parent *inode
	index  int // in parent.entries
}

func (c *converter) convert(n *Node, parent *inode) (*inode, error) {
	path := func() string { return n.Path() }
	if err := validateMode(n.Mode); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrInvalidTree, path(), err)
	}
	in := c.newInode()
	*in = inode{
		parent: parent, mode: n.Mode, nlink: n.Nlink, uid: n.UID, gid: n.GID,
		rdev: n.Rdev, size: n.Size, mtime: n.Mtime, payload: n.Payload, digest: n.Digest,
	}
	if in.mtime.Nsec >= 1e9 {
		return nil, fmt.Errorf("%w: %s: mtime nanoseconds %d out of range", ErrInvalidTree, path(), in.mtime.Nsec)
	}
	if strings.IndexByte(n.Payload, 0) >= 0 {
		return nil, fmt.Errorf("%w: %s: symlink target or payload contains NUL", ErrInvalidTree, path())
	}
	switch in.typ() {
	case ModeSymlink:
		if len(n.Payload) == 0 || len(n.Payload) > MaxSymlinkLen {
			return nil, fmt.Errorf("%w: %s: symlink target must be 1..%d bytes", ErrInvalidTree, path(), MaxSymlinkLen)
		}
		in.size = uint64(len(n.Payload))
	case ModeRegular:
		if n.Content != nil && len(n.Content) > 0 {
			if len(n.Content) > MaxInlineContent {
				return nil, fmt.Errorf("%w: %s: %d bytes of inline content, more than %d", ErrInvalidTree, path(), len(n.Content), MaxInlineContent)
			}
			in.content = n.Content
			in.size = uint64(len(n.Content))
		}
		if len(n.Payload) >= 4096 {
			return nil, fmt.Errorf("%w: %s: payload longer than 4095 bytes", ErrInvalidTree, path())
		}
	case ModeChar:
		if n.Rdev == 0 {
			c.hasWhiteout = true
		}
	}
	in.xattrs = make([]Xattr, 0, len(n.Xattrs))
	for _, x := range n.Xattrs {
		if len(x.Key) == 0 || len(x.Key) > MaxXattrKeyLen || strings.IndexByte(x.Key, 0) >= 0 {
			return nil, fmt.Errorf("%w: %s: invalid xattr key %q", ErrInvalidTree, path(), truncateForError(x.Key))
		}
		if len(x.Value) > MaxXattrValueLen {
			return nil, fmt.Errorf("%w: %s: xattr %s value longer than %d", ErrInvalidTree, path(), x.Key, MaxXattrValueLen)
		}
		in.setXattr(x.Key, x.Value)
	}
	if _, ok := c.byNode[n]; ok {
		c.byNode[n] = in
	}
	if in.typ() != ModeDir {
		return in, nil
	}
	in.entries = make([]dirent, 0, len(n.Children)+2)
	for i, ch := range n.Children {
		if err := checkName(ch.Name); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrInvalidTree, path(), err)
		}
		if i > 0 && n.Children[i-1].Name >= ch.Name {
			return nil, fmt.Errorf("%w: %s: children not sorted or duplicate name %q", ErrInvalidTree, path(), ch.Name)
		}
		if ch.LinkTo != nil {
			c.aliases = append(c.aliases, aliasEntry{node: ch, parent: in, index: len(in.entries)})
			in.entries = append(in.entries, dirent{name: ch.Name, alias: true})
			continue
		}
		child, err := c.convert(ch, in)
		if err != nil {
			return nil, err
		}
		in.entries = append(in.entries, dirent{name: ch.Name, target: child})
	}
	return in, nil
}

// resolveAliases points every hardlink entry at its target's inode.
func (c *converter) resolveAliases() error {
	for _, a := range c.aliases {
		t, err := followLinks(a.node)
		if err != nil {
			return fmt.Errorf("%w: hardlink %s: %v", ErrInvalidTree, a.node.Name, err)
		}
		target := c.byNode[t]
		if target == nil {
			return fmt.Errorf("%w: hardlink %s: its target is not in the tree", ErrInvalidTree, a.node.Name)
		}
		if target.typ() == ModeDir {
			return fmt.Errorf("%w: hardlink %s: its target is a directory", ErrInvalidTree, a.node.Name)
		}
		a.parent.entries[a.index].target = target
	}
	return nil
}

func (in *inode) setXattr(key string, value []byte) {
	for i := range in.xattrs {
		if in.xattrs[i].Key == key {
			in.xattrs[i].Value = value
			return
		}
	}
	in.xattrs = append(in.xattrs, Xattr{Key: key, Value: value})
}

// rewriteOverlay applies the overlay-specific rewriting of §2.9 in pre-order.
func rewriteOverlay(in *inode, version int) {
	for i := range in.xattrs {
		if strings.HasPrefix(in.xattrs[i].Key, xattrTrustedOverlay) {
			in.xattrs[i].Key = xattrEscapedPrefix + in.xattrs[i].Key[len(xattrTrustedOverlay):]
		}
	}
	switch {
	case in.typ() == ModeRegular && in.size > 0 && in.content == nil:
		in.external = true
		var meta []byte
		if in.digest != nil {
			meta = make([]byte, 4+DigestSize)
			copy(meta, []byte{0, 36, 0, 1}) // version 0, length 36, flags 0, FS_VERITY_HASH_ALG_SHA256
			copy(meta[4:], in.digest[:])
		}
		in.setXattr(xattrMetacopy, meta)
		if in.payload != "" {
			in.setXattr(xattrRedirect, []byte("/"+in.payload))
		}
	case in.typ() == ModeChar && in.rdev == 0:
		in.mode = ModeRegular | in.mode&^ModeTypeMask
		in.size = 0
		in.content = nil
		in.setXattr(xattrEscapedPrefix+"whiteout", []byte{})
		in.setXattr("user.overlay.whiteout", []byte{})
		p := in.parent
		p.setXattr(xattrEscapedPrefix+"whiteouts", []byte{})
		p.setXattr("user.overlay.whiteouts", []byte{})
		if version >= 1 {
			p.setXattr(xattrEscapedPrefix+"opaque", []byte("x"))
			p.setXattr("user.overlay.opaque", []byte("x"))
		}
	}
	if in.typ() != ModeDir {
		return
	}
	for _, e := range in.entries {
		if !e.alias {
			rewriteOverlay(e.target, version)
		}
	}
}

// addRootWhiteouts marks the root opaque and adds the whiteouts 00..ff that
// hide an object store's fan-out directories, then adds "." and ".." to every
// directory and sorts the entries.
func addRootWhiteouts(root *inode) {
	root.setXattr(xattrOpaque, []byte("y"))
	selinux, hasSelinux := []byte(nil), false
	for _, x := range root.xattrs {
		if x.Key == "security.selinux" {
			selinux, hasSelinux = x.Value, true
		}
	}
	existing := make(map[string]bool, len(root.entries))
	for _, e := range root.entries {
		existing[e.name] = true
	}
	for i := 0; i < 256; i++ {
		name := fmt.Sprintf("%02x", i)
		if existing[name] {
			continue
		}
		wh := &inode{parent: root, mode: ModeChar | 0o644, nlink: 1, uid: root.uid, gid: root.gid, mtime: root.mtime}
		if hasSelinux {
			wh.xattrs = []Xattr{{Key: "security.selinux", Value: selinux}}
		}
		root.entries = append(root.entries, dirent{name: name, target: wh})
	}
	addDots(root, root)
}

func addDots(dir, parent *inode) {
	dir.entries = append(dir.entries, dirent{name: ".", target: dir, alias: true}, dirent{name: "..", target: parent, alias: true})
	sort.Slice(dir.entries, func(i, j int) bool { return dir.entries[i].name < dir.entries[j].name })
	for _, e := range dir.entries {
		if !e.alias && e.target.typ() == ModeDir {
			addDots(e.target, dir)
		}
	}
}

// bfs numbers the inodes breadth first and computes the tree-wide values.
func (l *imageLayout) bfs(root *inode) {
	l.inodes = []*inode{root}
	l.minMtime = root.mtime
	for i := 0; i < len(l.inodes); i++ {
		in := l.inodes[i]
		in.ino = uint32(i)
		if in.mtime.Less(l.minMtime) {
			l.minMtime = in.mtime
		}
		sortXattrs(in.xattrs)
		for _, x := range in.xattrs {
			if x.Key == xattrACLAccess || x.Key == xattrACLDefault {
				l.hasACL = true
			}
		}
		if in.typ() != ModeDir {
			continue
		}
		in.nlink = 2
		for _, e := range in.entries {
			if e.alias {
				continue
			}
			if e.target.typ() == ModeDir {
				in.nlink++
			}
			l.inodes = append(l.inodes, e.target)
		}
	}
}

// xattrPairs counts the distinct (key, value) pairs of a tree by hash,
// comparing the pairs whose hashes collide: no string is built per xattr.
type xattrPairs struct {
	seed  maphash.Seed
	byKey map[uint64][]*sharedXattr
}

func (p *xattrPairs) find(x Xattr) *sharedXattr {
	var h maphash.Hash
	h.SetSeed(p.seed)
	h.WriteString(x.Key)
	h.WriteByte(0)
	h.Write(x.Value)
	sum := h.Sum64()
	for _, s := range p.byKey[sum] {
		if s.key == x.Key && bytes.Equal(s.value, x.Value) {
			return s
		}
	}
	s := &sharedXattr{key: x.Key, value: x.Value}
	p.byKey[sum] = append(p.byKey[sum], s)
	return s
}

// shareXattrs picks the (key, value) pairs used by more than one inode and
// assigns each inode its shared references and inline entries (§2.5.4).
func (l *imageLayout) shareXattrs() {
	pairs := xattrPairs{seed: maphash.MakeSeed(), byKey: map[uint64][]*sharedXattr{}}
	var refs []*sharedXattr // the pair of each xattr of each inode, in order
	for _, in := range l.inodes {
		for _, x := range in.xattrs {
			s := pairs.find(x)
			s.count++
			refs = append(refs, s)
		}
	}
	for _, ss := range pairs.byKey {
		for _, s := range ss {
			if s.count > 1 {
				l.shared = append(l.shared, s)
			}
		}
	}
	sort.Slice(l.shared, func(i, j int) bool {
		a, b := l.shared[i], l.shared[j]
		if a.key != b.key {
			return a.key > b.key
		}
		if len(a.value) != len(b.value) {
			return len(a.value) > len(b.value)
		}
		return bytes.Compare(a.value, b.value) > 0
	})
	for _, s := range l.shared {
		s.offset = l.sharedSize
		l.sharedSize += uint64(xattrEntrySize(s.key, s.value))
	}
	for _, in := range l.inodes {
		in.inline = in.inline[:0]
		nShared := 0
		mine := refs[:len(in.xattrs)]
		refs = refs[len(in.xattrs):]
		for i, x := range in.xattrs {
			if s := mine[i]; s.count > 1 && nShared < maxSharedRefs {
				mine[nShared] = s // done with mine[i]; keep the shared ones in order
				nShared++
			} else {
				in.inline = append(in.inline, x)
			}
			idx, suffix := xattrPrefix(x.Key)
			in.filter |= 1 << (xxh32String(suffix, erofsXattrFilterSeed+uint32(idx)) & 31)
		}
		in.filter = ^in.filter
		if len(in.xattrs) == 0 {
			continue
		}
		in.xattrSize = xattrHeaderSize + 4*nShared
		for _, x := range in.inline {
			in.xattrSize += xattrEntrySize(x.Key, x.Value)
		}
		// Shared ids depend on where the inode table ends; keep offsets now.
		in.shared = make([]uint32, nShared)
		for i, s := range mine[:nShared] {
			in.shared[i] = uint32(s.offset)
		}
	}
}

// xattrPrefix maps a key to its EROFS prefix index and stored suffix.
func xattrPrefix(key string) (uint8, string) {
	switch {
	case strings.HasPrefix(key, "user."):
		return 1, key[len("user."):]
	case strings.HasPrefix(key, xattrACLAccess):
		return 2, key[len(xattrACLAccess):]
	case strings.HasPrefix(key, xattrACLDefault):
		return 3, key[len(xattrACLDefault):]
	case strings.HasPrefix(key, "trusted."):
		return 4, key[len("trusted."):]
	case strings.HasPrefix(key, "security."):
		return 6, key[len("security."):]
	}
	return 0, key
}

func xattrEntrySize(key string, value []byte) int {
	_, suffix := xattrPrefix(key)
	return roundUp(4+len(suffix)+len(value), 4)
}

func roundUp[T int | uint64](v, align T) T { return (v + align - 1) / align * align }

// dirChunks splits directory entries into chunks (start indices) and
// returns the number of full blocks and the inline tail size.
func dirChunks(entries []dirent) (starts []int, nBlocks uint64, tail int) {
	cur := 0
	starts = []int{0}
	for i, e := range entries {
		sz := direntSize + len(e.name)
		if cur+sz > blkSize {
			nBlocks++
			cur = 0
			starts = append(starts, i)
		}
		cur += sz
	}
	if cur > blkSize/2 {
		nBlocks++
		cur = 0
	}
	return starts, nBlocks, cur
}

// place computes sizes, inode formats and positions (§2.6, §2.7).
func (l *imageLayout) place() error {
	pos := uint64(inodesStart)
	for _, in := range l.inodes {
		switch in.typ() {
		case ModeDir:
			_, in.nBlocks, in.tail = dirChunks(in.entries)
		case ModeSymlink:
			in.tail = len(in.payload)
		case ModeRegular:
			switch {
			case in.size == 0:
			case in.content != nil:
				in.nBlocks = in.size / blkSize
				in.tail = int(in.size % blkSize)
				if in.tail > blkSize/2 {
					in.nBlocks++
					in.tail = 0
				}
			default:
				in.chunkBits = max(uint(blkBits), uint(bits.Len64(in.size-1)))
				in.chunkBits = min(in.chunkBits, maxChunkBits)
				in.chunkCount = (in.size + (1 << in.chunkBits) - 1) >> in.chunkBits
				if in.chunkCount > 1024 {
					return fmt.Errorf("%w: a %d-byte file is too large for composefs", ErrInvalidTree, in.size)
				}
				in.tail = int(in.chunkCount * 4)
			}
		}
		size := in.size
		if in.typ() == ModeDir {
			size = in.nBlocks*blkSize + uint64(in.tail)
		}
		in.compact = in.mtime == l.minMtime && in.nlink <= 0xffff && in.uid <= 0xffff && in.gid <= 0xffff && size <= 0xffffffff
		isize := uint64(extendedSize)
		if in.compact {
			isize = compactSize
		}
		xsize := uint64(in.xattrSize)
		if (xsize-xattrHeaderSize)/4+1 > 0xffff && xsize > 0 {
			return fmt.Errorf("%w: inode %d: xattrs too large", ErrInvalidTree, in.ino)
		}
		pos = roundUp(pos, slotSize)
		tail := uint64(in.tail)
		if in.typ() == ModeSymlink {
			total := isize + xsize + tail
			if total >= blkSize {
				in.nBlocks = 1
				in.tail = 0
			}
			if pos/blkSize != (pos+total-1)/blkSize {
				pos = roundUp(pos, blkSize)
			}
		} else if rem := blkSize - (pos+isize+xsize)%blkSize; rem < tail {
			pad := roundUp(rem, slotSize)
			rem2 := blkSize - (pos+isize+xsize+pad)%blkSize
			if tail <= rem2 {
				pos += pad
			} else {
				// The tail moves to a data block. Only an external file's
				// chunk map of more than ~4000 bytes (a file over 8.7 PB)
				// gets here: mkcomposefs then writes the map as a block of
				// holes the inode does not point at, while the kernel reads
				// the map from the bytes after the inode. Written as
				// mkcomposefs writes it (upstream's own test vectors have
				// such files); the strict reader refuses such an image
				// before a mount.
				in.nBlocks++
				in.tail = 0
				pos = roundUp(pos, blkSize)
			}
		}
		in.offset = pos
		pos += isize + xsize + uint64(in.tail)
	}
	if l.inodes[0].offset/slotSize >= 0xffff {
		return fmt.Errorf("%w: root inode number out of range", ErrInvalidTree)
	}
	l.inodesEnd = roundUp(pos, slotSize)
	base := uint32(l.inodesEnd % blkSize)
	for _, in := range l.inodes {
		for i := range in.shared {
			in.shared[i] = (base + in.shared[i]) / 4
		}
	}
	l.dataStart = roundUp(l.inodesEnd+l.sharedSize, blkSize)
	next := l.dataStart / blkSize
	for _, in := range l.inodes {
		if in.nBlocks > 0 {
			if next > 0xffffffff {
				return fmt.Errorf("%w: image larger than 16 TiB", ErrInvalidTree)
			}
			in.blkaddr = uint32(next)
			next += in.nBlocks
		}
	}
	l.blocks = next
	if l.blocks > 0xffffffff {
		return fmt.Errorf("%w: image larger than 16 TiB", ErrInvalidTree)
	}
	return nil
}

// emitter writes sequentially, remembering the first error.
type emitter struct {
	w   *bufio.Writer
	n   int64
	err error
	buf [extendedSize]byte
}

func (e *emitter) write(b []byte) {
	if e.err != nil {
		return
	}
	var n int
	n, e.err = e.w.Write(b)
	e.n += int64(n)
}

var zeros [blkSize]byte

// nullAddr is EROFS_NULL_ADDR, a hole in a chunk map.
var nullAddr = [4]byte{0xff, 0xff, 0xff, 0xff}

func (e *emitter) zeroTo(off int64) {
	for e.n < off && e.err == nil {
		e.write(zeros[:min(off-e.n, blkSize)])
	}
}

func (l *imageLayout) emit(e *emitter) {
	le := binary.LittleEndian
	var hdr [32]byte
	le.PutUint32(hdr[0:], ComposefsMagic)
	le.PutUint32(hdr[4:], ComposefsHeaderVer)
	if l.hasACL {
		le.PutUint32(hdr[8:], ComposefsFlagHasACL)
	}
	le.PutUint32(hdr[12:], uint32(l.version))
	e.write(hdr[:])
	e.zeroTo(superOffset)

	var sb [superSize]byte
	le.PutUint32(sb[0:], ErofsMagic)
	le.PutUint32(sb[8:], erofsCompatMtime|erofsCompatXattrFilt)
	sb[12] = blkBits
	le.PutUint16(sb[14:], uint16(l.inodes[0].offset/slotSize))
	le.PutUint64(sb[16:], uint64(len(l.inodes)))
	le.PutUint64(sb[24:], uint64(l.minMtime.Sec))
	le.PutUint32(sb[32:], l.minMtime.Nsec)
	le.PutUint32(sb[36:], uint32(l.blocks))
	le.PutUint32(sb[44:], uint32(l.inodesEnd/blkSize))
	e.write(sb[:])

	for _, in := range l.inodes {
		e.zeroTo(int64(in.offset))
		l.emitInode(e, in)
	}
	e.zeroTo(int64(l.inodesEnd))
	for _, s := range l.shared {
		emitXattrEntry(e, s.key, s.value)
	}
	e.zeroTo(int64(l.dataStart))
	for _, in := range l.inodes {
		if in.nBlocks == 0 {
			continue
		}
		switch in.typ() {
		case ModeDir:
			starts, _, _ := dirChunks(in.entries)
			for i := uint64(0); i < in.nBlocks; i++ {
				end := len(in.entries)
				if int(i)+1 < len(starts) {
					end = starts[i+1]
				}
				start := e.n
				emitDirChunk(e, in.entries[starts[i]:end])
				e.zeroTo(start + blkSize)
			}
		case ModeRegular:
			if in.external {
				// A chunk map that did not fit beside its inode: mkcomposefs
				// writes 1024 holes, whatever the chunk count.
				for range blkSize / 4 {
					e.write(nullAddr[:])
				}
				continue
			}
			start := e.n
			e.write(in.content[:min(len(in.content), blkSize)])
			e.zeroTo(start + blkSize)
		case ModeSymlink:
			start := e.n
			e.write([]byte(in.payload))
			e.zeroTo(start + blkSize)
		}
	}
}

func (l *imageLayout) emitInode(e *emitter, in *inode) {
	le := binary.LittleEndian
	layout := uint16(layoutFlatPlain)
	if in.tail > 0 {
		layout = layoutFlatInline
	}
	var size uint64
	var iu uint32
	switch in.typ() {
	case ModeDir:
		size = in.nBlocks*blkSize + uint64(in.tail)
		if in.nBlocks > 0 {
			iu = in.blkaddr
		}
	case ModeChar, ModeBlock:
		iu = uint32(in.rdev)
	case ModeRegular, ModeSymlink:
		size = in.size
		if in.nBlocks > 0 {
			iu = in.blkaddr
		}
		if in.external {
			// i_u is a union: mkcomposefs sets the block address of a chunk
			// map that did not fit beside the inode, then overwrites its low
			// 16 bits with the chunk format.
			layout = layoutChunkBased
			iu = iu&0xffff0000 | uint32(in.chunkBits-blkBits)
		}
	}
	icount := uint16(0)
	if in.xattrSize > 0 {
		icount = uint16((in.xattrSize-xattrHeaderSize)/4 + 1)
	}
	b := e.buf[:]
	clear(b)
	if in.compact {
		b = b[:compactSize]
		le.PutUint16(b[0:], layout<<1)
		le.PutUint16(b[2:], icount)
		le.PutUint16(b[4:], uint16(in.mode))
		le.PutUint16(b[6:], uint16(in.nlink))
		le.PutUint32(b[8:], uint32(size))
		le.PutUint32(b[16:], iu)
		le.PutUint32(b[20:], in.ino)
		le.PutUint16(b[24:], uint16(in.uid))
		le.PutUint16(b[26:], uint16(in.gid))
	} else {
		le.PutUint16(b[0:], layout<<1|1)
		le.PutUint16(b[2:], icount)
		le.PutUint16(b[4:], uint16(in.mode))
		le.PutUint64(b[8:], size)
		le.PutUint32(b[16:], iu)
		le.PutUint32(b[20:], in.ino)
		le.PutUint32(b[24:], in.uid)
		le.PutUint32(b[28:], in.gid)
		le.PutUint64(b[32:], uint64(in.mtime.Sec))
		le.PutUint32(b[40:], in.mtime.Nsec)
		le.PutUint32(b[44:], in.nlink)
	}
	e.write(b)

	if in.xattrSize > 0 {
		var xh [xattrHeaderSize]byte
		le.PutUint32(xh[0:], in.filter)
		xh[4] = byte(len(in.shared))
		e.write(xh[:])
		var id [4]byte
		for _, s := range in.shared {
			le.PutUint32(id[:], s)
			e.write(id[:])
		}
		for _, x := range in.inline {
			emitXattrEntry(e, x.Key, x.Value)
		}
	}
	if in.tail == 0 {
		return
	}
	switch in.typ() {
	case ModeDir:
		starts, _, _ := dirChunks(in.entries)
		emitDirChunk(e, in.entries[starts[len(starts)-1]:])
	case ModeSymlink:
		e.write([]byte(in.payload))
	case ModeRegular:
		if in.external {
			for range in.chunkCount {
				e.write(nullAddr[:])
			}
		} else {
			e.write(in.content[len(in.content)-in.tail:])
		}
	}
}

func emitXattrEntry(e *emitter, key string, value []byte) {
	idx, suffix := xattrPrefix(key)
	var h [4]byte
	h[0] = byte(len(suffix))
	h[1] = idx
	binary.LittleEndian.PutUint16(h[2:], uint16(len(value)))
	e.write(h[:])
	e.write([]byte(suffix))
	e.write(value)
	if pad := roundUp(4+len(suffix)+len(value), 4) - (4 + len(suffix) + len(value)); pad > 0 {
		e.write(zeros[:pad])
	}
}

// direntType maps a mode to the EROFS dirent file type.
func direntType(mode uint32) uint8 {
	switch mode & ModeTypeMask {
	case ModeRegular:
		return 1
	case ModeDir:
		return 2
	case ModeChar:
		return 3
	case ModeBlock:
		return 4
	case ModeFIFO:
		return 5
	case ModeSocket:
		return 6
	case ModeSymlink:
		return 7
	}
	return 0
}

func emitDirChunk(e *emitter, entries []dirent) {
	nameoff := uint16(direntSize * len(entries))
	var d [direntSize]byte
	for _, ent := range entries {
		binary.LittleEndian.PutUint64(d[0:], ent.target.offset/slotSize)
		binary.LittleEndian.PutUint16(d[8:], nameoff)
		d[10] = direntType(ent.target.mode)
		d[11] = 0
		e.write(d[:])
		nameoff += uint16(len(ent.name))
	}
	for _, ent := range entries {
		e.write([]byte(ent.name))
	}
}
