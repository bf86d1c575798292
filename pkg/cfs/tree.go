// Package cfs reads and writes composefs images (EROFS metadata images whose
// regular files point into a content-addressed object store), computes
// fs-verity digests, and mounts images with erofs and overlayfs.
package cfs

import (
	"fmt"
	"sort"
	"strings"
)

// File type bits of a mode, as in <sys/stat.h>.
const (
	ModeTypeMask = 0o170000
	ModeSocket   = 0o140000
	ModeSymlink  = 0o120000
	ModeRegular  = 0o100000
	ModeBlock    = 0o060000
	ModeDir      = 0o040000
	ModeChar     = 0o020000
	ModeFIFO     = 0o010000
)

// Limits of the composefs format (mkcomposefs 1.0.8).
const (
	MaxNameLen          = 255
	MaxSymlinkLen       = 4095
	MaxInlineContent    = 5000 // from a dumpfile
	DirInlineContentMax = 64   // from a directory (LCFS_RECOMMENDED_INLINE_CONTENT_MAX)
	MaxXattrKeyLen      = 255
	MaxXattrValueLen    = 65535
	maxXattrBudget      = 32767 // Σ(7 + keylen + valuelen) + 12 per inode
)

// Timespec is a modification time.
type Timespec struct {
	Sec  int64
	Nsec uint32
}

// Less orders timespecs by seconds, then nanoseconds.
func (t Timespec) Less(o Timespec) bool {
	return t.Sec < o.Sec || (t.Sec == o.Sec && t.Nsec < o.Nsec)
}

// Xattr is one extended attribute with its full key ("user.foo").
type Xattr struct {
	Key   string
	Value []byte
}

// Node is one entry of a composefs tree, as the writer takes it and the
// reader gives it back.
type Node struct {
	Name   string // "" for the root
	Parent *Node

	Mode  uint32 // file type and permission bits
	Nlink uint32
	UID   uint32
	GID   uint32
	Rdev  uint64 // glibc dev_t, for character and block devices
	Size  uint64
	Mtime Timespec

	// Payload is the symlink target, or for a regular file the path of its
	// backing object relative to the store ("xx/yyyy…"); "" means none.
	Payload string
	// Content is a regular file's inline data; nil means none.
	Content []byte
	// Digest is a regular file's fs-verity digest (metacopy); nil means none.
	Digest *Digest
	// Xattrs in order: the writer sorts them by key, the reader gives them
	// in image order (inline ones, then shared ones).
	Xattrs []Xattr

	// Children of a directory, sorted by name (byte order).
	Children []*Node

	// LinkTo is set on a hardlink alias; every other field of an alias is
	// ignored and the target's are used.
	LinkTo *Node

	nid uint64 // the inode's nid in the image Open read it from, else 0
}

// Type returns the file type bits of the mode.
func (n *Node) Type() uint32 { return n.Mode & ModeTypeMask }

// IsDir reports whether n is a directory (never true for an alias).
func (n *Node) IsDir() bool { return n.LinkTo == nil && n.Type() == ModeDir }

// Target follows hardlink aliases to the node that holds the inode.
func (n *Node) Target() *Node {
	for n.LinkTo != nil {
		n = n.LinkTo
	}
	return n
}

// Path returns the absolute path of n in its tree.
func (n *Node) Path() string {
	if n.Parent == nil {
		return "/"
	}
	var parts []string
	for c := n; c.Parent != nil; c = c.Parent {
		parts = append(parts, c.Name)
	}
	var b strings.Builder
	for i := len(parts) - 1; i >= 0; i-- {
		b.WriteByte('/')
		b.WriteString(parts[i])
	}
	return b.String()
}

// Child returns the direct child called name, or nil.
func (n *Node) Child(name string) *Node {
	i := sort.Search(len(n.Children), func(i int) bool { return n.Children[i].Name >= name })
	if i < len(n.Children) && n.Children[i].Name == name {
		return n.Children[i]
	}
	return nil
}

// AddChild inserts c into directory n, keeping the children sorted. A name
// that exists already is an error.
func (n *Node) AddChild(c *Node) error {
	if !n.IsDir() {
		return fmt.Errorf("%s: not a directory", n.Path())
	}
	if err := checkName(c.Name); err != nil {
		return fmt.Errorf("%s: %w", n.Path(), err)
	}
	i := sort.Search(len(n.Children), func(i int) bool { return n.Children[i].Name >= c.Name })
	if i < len(n.Children) && n.Children[i].Name == c.Name {
		return fmt.Errorf("%s: duplicate entry %q", n.Path(), c.Name)
	}
	n.Children = append(n.Children, nil)
	copy(n.Children[i+1:], n.Children[i:])
	n.Children[i] = c
	c.Parent = n
	return nil
}

func checkName(name string) error {
	switch {
	case name == "" || name == "." || name == "..":
		return fmt.Errorf("invalid name %q", name)
	case len(name) > MaxNameLen:
		return fmt.Errorf("name %q is %d bytes, longer than %d", truncateForError(name), len(name), MaxNameLen)
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("name %q contains '/' or NUL", truncateForError(name))
	}
	return nil
}

// Lookup finds a node by absolute or root-relative path; it does not follow
// symlinks. It returns nil when the path does not exist.
func (n *Node) Lookup(path string) *Node {
	cur := n
	for _, part := range strings.Split(path, "/") {
		if part == "" || part == "." {
			continue
		}
		if part == ".." {
			if cur.Parent != nil {
				cur = cur.Parent
			}
			continue
		}
		if !cur.IsDir() { // aliases are never directories
			return nil
		}
		cur = cur.Child(part)
		if cur == nil {
			return nil
		}
	}
	return cur
}

// Xattr returns the value of key and whether it is set.
func (n *Node) Xattr(key string) ([]byte, bool) {
	for _, x := range n.Xattrs {
		if x.Key == key {
			return x.Value, true
		}
	}
	return nil, false
}

// SetXattr sets key to value, replacing an existing value.
func (n *Node) SetXattr(key string, value []byte) {
	for i := range n.Xattrs {
		if n.Xattrs[i].Key == key {
			n.Xattrs[i].Value = value
			return
		}
	}
	n.Xattrs = append(n.Xattrs, Xattr{Key: key, Value: value})
}

// RemoveXattr deletes key if present.
func (n *Node) RemoveXattr(key string) {
	for i := range n.Xattrs {
		if n.Xattrs[i].Key == key {
			n.Xattrs = append(n.Xattrs[:i], n.Xattrs[i+1:]...)
			return
		}
	}
}

// sortXattrs orders xattrs by key with byte comparison (strcmp).
func sortXattrs(xs []Xattr) {
	sort.Slice(xs, func(i, j int) bool { return xs[i].Key < xs[j].Key })
}

// Walk calls fn for n and every node below it, depth first with children in
// name order. Hardlink aliases are visited as entries; directories are
// entered only through non-alias nodes. fn returning an error stops the walk.
func (n *Node) Walk(fn func(*Node) error) error {
	if err := fn(n); err != nil {
		return err
	}
	if n.IsDir() {
		for _, c := range n.Children {
			if err := c.Walk(fn); err != nil {
				return err
			}
		}
	}
	return nil
}

// Objects lists the distinct objects (by digest) that the regular files of
// the tree under n name, in walk order, with each one's size and payload
// path. first, when not nil, is called with the first node naming each.
func (n *Node) Objects(first func(*Node)) []Object {
	seen := make(map[Digest]bool)
	var objs []Object
	_ = n.Walk(func(c *Node) error {
		if c.LinkTo == nil && c.Type() == ModeRegular && c.Digest != nil && !seen[*c.Digest] {
			seen[*c.Digest] = true
			objs = append(objs, Object{Digest: *c.Digest, Size: c.Size, Path: c.Payload})
			if first != nil {
				first(c)
			}
		}
		return nil
	})
	return objs
}

// IsWhiteout reports whether n is an overlay whiteout: a character device 0:0.
func (n *Node) IsWhiteout() bool { return n.LinkTo == nil && n.Type() == ModeChar && n.Rdev == 0 }

// Makedev encodes major and minor as glibc's dev_t.
func Makedev(major, minor uint32) uint64 {
	return uint64(minor&0xff) | uint64(major&0xfff)<<8 | uint64(minor&^0xff)<<12 | uint64(major&^0xfff)<<32
}

// Major and Minor decode a glibc dev_t.
func Major(dev uint64) uint32 { return uint32((dev>>8)&0xfff) | uint32((dev>>32)&^0xfff) }

// Minor decodes the minor number of a glibc dev_t.
func Minor(dev uint64) uint32 { return uint32(dev&0xff) | uint32((dev>>12)&^0xff) }
