package oci

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// Conversion of container image layers into one composefs tree, with
// composefs-rs's rules (transform_for_oci): layers in diff_ids order;
// ".wh.NAME" removes NAME, ".wh..wh..opq" empties its directory where it
// appears; hard links share the inode of an entry that exists already; a
// missing parent directory is an error; a directory in several layers
// takes the last one's metadata; xattrs other than security.capability
// are dropped; files of at most 64 bytes are inline; then the root takes
// /usr's mode, owner, mtime and xattrs (a documented fallback without
// /usr) and /run is emptied. Device nodes, absolute paths and ".." are
// refused: a volume is no place for them, and refusing them keeps a
// hostile layer inside the tree.
//
// ConvertVersion is the version of these rules: it is part of the cache
// key of converted images, and changes when the output would.
const ConvertVersion = "1"

const (
	whiteoutPrefix = ".wh."
	opaqueWhiteout = ".wh..wh..opq"
)

// keptXattrs are the xattrs a converted image keeps.
var keptXattrs = map[string]bool{"security.capability": true}

// ConvertLimits bound what a conversion accepts.
type ConvertLimits struct {
	// MaxEntries bounds the tar entries of all layers; 0 means 4,000,000.
	MaxEntries int
	// MaxBytes bounds the uncompressed bytes of all layers; 0 means 64 GiB.
	MaxBytes int64
	// MaxFileSize bounds one file; 0 means 16 GiB.
	MaxFileSize int64
}

func (l *ConvertLimits) setDefaults() {
	if l.MaxEntries <= 0 {
		l.MaxEntries = 4_000_000
	}
	if l.MaxBytes <= 0 {
		l.MaxBytes = 64 << 30
	}
	if l.MaxFileSize <= 0 {
		l.MaxFileSize = 16 << 30
	}
}

// ErrBadLayer is wrapped by errors about a layer's content.
var ErrBadLayer = errors.New("invalid layer")

// ObjectWriter stores a regular file's content and returns its digest.
type ObjectWriter func(ctx context.Context, r io.Reader, size int64) (cfs.Digest, error)

// treeBuilder applies layers to a tree.
type treeBuilder struct {
	root    *cfs.Node
	limits  ConvertLimits
	entries int
	bytes   int64
	write   ObjectWriter
}

func newTreeBuilder(limits ConvertLimits, write ObjectWriter) *treeBuilder {
	limits.setDefaults()
	return &treeBuilder{root: &cfs.Node{Mode: cfs.ModeDir | 0o755, Nlink: 2}, limits: limits, write: write}
}

// layerError names the entry a layer error is about.
func layerError(layer int, name, format string, args ...any) error {
	return fmt.Errorf("layer %d: entry %q: %s: %w", layer, truncate(name), fmt.Sprintf(format, args...), ErrBadLayer)
}

// cleanName turns a tar name into a path relative to the root; "" is the
// root itself.
func cleanName(name string) (string, error) {
	if strings.HasPrefix(name, "/") {
		return "", errors.New("absolute path")
	}
	if strings.ContainsRune(name, 0) {
		return "", errors.New("NUL in the name")
	}
	n := strings.TrimSuffix(name, "/")
	for _, part := range strings.Split(n, "/") {
		if part == ".." {
			return "", errors.New("a .. component")
		}
	}
	c := path.Clean(n)
	if c == "." {
		return "", nil
	}
	return c, nil
}

// applyLayer applies one uncompressed layer stream.
func (b *treeBuilder) applyLayer(ctx context.Context, layer int, r io.Reader) error {
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("layer %d: reading the tar: %w: %w", layer, ErrBadLayer, err)
		}
		if b.entries++; b.entries > b.limits.MaxEntries {
			return fmt.Errorf("layer %d: more than %d entries in the image: %w", layer, b.limits.MaxEntries, ErrBadLayer)
		}
		if err := b.apply(ctx, layer, h, tr); err != nil {
			return err
		}
	}
}

func (b *treeBuilder) apply(ctx context.Context, layer int, h *tar.Header, body io.Reader) error {
	name, err := cleanName(h.Name)
	if err != nil {
		return layerError(layer, h.Name, "%v", err)
	}
	dir, base := path.Split(name)
	dir = strings.TrimSuffix(dir, "/")
	if name == "" {
		if h.Typeflag != tar.TypeDir {
			return layerError(layer, h.Name, "the root must be a directory")
		}
		b.setMeta(b.root, h)
		return nil
	}
	parent := b.root.Lookup(dir)
	if parent == nil || !parent.IsDir() {
		return layerError(layer, h.Name, "its parent directory %q does not exist", "/"+dir)
	}
	if base == opaqueWhiteout {
		parent.Children = nil
		return nil
	}
	if strings.HasPrefix(base, whiteoutPrefix) {
		if c := parent.Child(strings.TrimPrefix(base, whiteoutPrefix)); c != nil {
			b.remove(parent, c)
		}
		return nil
	}
	old := parent.Child(base)
	switch h.Typeflag {
	case tar.TypeDir:
		if old != nil && old.IsDir() {
			b.setMeta(old, h) // the last layer's metadata wins; children stay
			return nil
		}
		n := &cfs.Node{Name: base, Mode: cfs.ModeDir, Nlink: 2}
		b.setMeta(n, h)
		return b.replace(layer, h, parent, old, n)
	case tar.TypeReg, tar.TypeRegA:
		if h.Size < 0 || h.Size > b.limits.MaxFileSize {
			return layerError(layer, h.Name, "%d bytes, more than the limit of %d", h.Size, b.limits.MaxFileSize)
		}
		if b.bytes += h.Size; b.bytes > b.limits.MaxBytes {
			return layerError(layer, h.Name, "the image's files exceed %d bytes", b.limits.MaxBytes)
		}
		n := &cfs.Node{Name: base, Mode: cfs.ModeRegular, Nlink: 1, Size: uint64(h.Size)}
		b.setMeta(n, h)
		switch {
		case h.Size == 0:
		case h.Size <= cfs.DirInlineContentMax:
			n.Content = make([]byte, h.Size)
			if _, err := io.ReadFull(body, n.Content); err != nil {
				return fmt.Errorf("layer %d: reading %q: %w: %w", layer, truncate(h.Name), ErrBadLayer, err)
			}
		default:
			d, err := b.write(ctx, body, h.Size)
			if err != nil {
				return fmt.Errorf("layer %d: %q: %w", layer, truncate(h.Name), err)
			}
			n.Digest = &d
			n.Payload = d.ObjectPath()
		}
		return b.replace(layer, h, parent, old, n)
	case tar.TypeSymlink:
		if h.Linkname == "" || len(h.Linkname) > cfs.MaxSymlinkLen {
			return layerError(layer, h.Name, "symlink target of %d bytes (want 1 to %d)", len(h.Linkname), cfs.MaxSymlinkLen)
		}
		n := &cfs.Node{Name: base, Mode: cfs.ModeSymlink, Nlink: 1, Payload: h.Linkname, Size: uint64(len(h.Linkname))}
		b.setMeta(n, h)
		return b.replace(layer, h, parent, old, n)
	case tar.TypeLink:
		tname, err := cleanName(h.Linkname)
		if err != nil || tname == "" {
			return layerError(layer, h.Name, "hard link to %q: not a path in the image", truncate(h.Linkname))
		}
		target := b.root.Lookup(tname)
		if target == nil {
			return layerError(layer, h.Name, "hard link to %q, which does not exist (yet)", "/"+tname)
		}
		if target.IsDir() {
			return layerError(layer, h.Name, "hard link to the directory %q", "/"+tname)
		}
		if target == old || (old != nil && old.Target() == target.Target()) {
			return nil // a link to itself: nothing changes
		}
		n := &cfs.Node{Name: base, LinkTo: target.Target()}
		return b.replace(layer, h, parent, old, n)
	case tar.TypeFifo:
		n := &cfs.Node{Name: base, Mode: cfs.ModeFIFO, Nlink: 1}
		b.setMeta(n, h)
		return b.replace(layer, h, parent, old, n)
	case tar.TypeChar, tar.TypeBlock:
		return layerError(layer, h.Name, "device nodes are not allowed in a volume")
	case tar.TypeXGlobalHeader:
		return nil
	default:
		return layerError(layer, h.Name, "unsupported entry type %q", h.Typeflag)
	}
}

// replace puts n in parent instead of old (if any).
func (b *treeBuilder) replace(layer int, h *tar.Header, parent, old, n *cfs.Node) error {
	if old != nil {
		b.remove(parent, old)
	}
	if err := parent.AddChild(n); err != nil {
		return layerError(layer, h.Name, "%v", err)
	}
	return nil
}

// remove takes c out of parent. Hard links to a removed inode keep it:
// finish gives it a new holder.
func (b *treeBuilder) remove(parent, c *cfs.Node) {
	for i, x := range parent.Children {
		if x == c {
			parent.Children = append(parent.Children[:i], parent.Children[i+1:]...)
			return
		}
	}
}

// setMeta copies a header's metadata into n.
func (b *treeBuilder) setMeta(n *cfs.Node, h *tar.Header) {
	n.Mode = n.Mode&cfs.ModeTypeMask | uint32(h.Mode)&0o7777
	n.UID, n.GID = uint32(h.Uid), uint32(h.Gid)
	n.Mtime = cfs.Timespec{Sec: h.ModTime.Unix(), Nsec: uint32(h.ModTime.Nanosecond())}
	if h.ModTime.IsZero() {
		n.Mtime = cfs.Timespec{}
	}
	n.Xattrs = nil
	for k, v := range h.PAXRecords {
		if key, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok && keptXattrs[key] {
			n.SetXattr(key, []byte(v))
		}
	}
}

// finish applies the final rules and returns the tree: the root copies
// /usr's metadata (fallback: 0755 root:root, mtime 0; noUsr reports it),
// /run is emptied and takes /usr's mtime, and hard links whose inode was
// removed are given a new holder.
func (b *treeBuilder) finish() (root *cfs.Node, noUsr bool, err error) {
	root = b.root
	usr := root.Child("usr")
	if usr != nil && usr.IsDir() {
		root.Mode = cfs.ModeDir | usr.Mode&0o7777
		root.UID, root.GID, root.Mtime = usr.UID, usr.GID, usr.Mtime
		root.Xattrs = append([]cfs.Xattr(nil), usr.Xattrs...)
	} else {
		noUsr = true
		root.Mode, root.UID, root.GID, root.Mtime, root.Xattrs = cfs.ModeDir|0o755, 0, 0, cfs.Timespec{}, nil
	}
	if run := root.Child("run"); run != nil && run.IsDir() {
		run.Children = nil
		if !noUsr {
			run.Mtime = usr.Mtime
		}
	}
	if err := rehomeLinks(root); err != nil {
		return nil, false, err
	}
	// Link counts: one per name of each inode (the writer counts
	// directories itself).
	links := make(map[*cfs.Node]uint32)
	_ = root.Walk(func(n *cfs.Node) error {
		if n.LinkTo != nil {
			links[n.Target()]++
		} else if !n.IsDir() {
			links[n]++
		}
		return nil
	})
	for n, c := range links {
		n.Nlink = c
	}
	return root, noUsr, nil
}

// rehomeLinks fixes hard links to an inode that left the tree (its first
// name was removed or replaced by a later layer): the first remaining
// alias, in walk order, becomes the inode and the others point to it.
func rehomeLinks(root *cfs.Node) error {
	inTree := make(map[*cfs.Node]bool)
	_ = root.Walk(func(n *cfs.Node) error {
		if n.LinkTo == nil {
			inTree[n] = true
		}
		return nil
	})
	holder := make(map[*cfs.Node]*cfs.Node)
	return root.Walk(func(n *cfs.Node) error {
		t := n.LinkTo
		if t == nil || inTree[t] {
			return nil
		}
		if h, ok := holder[t]; ok {
			n.LinkTo = h
			return nil
		}
		// n takes the inode over.
		name, parent := n.Name, n.Parent
		*n = *t
		n.Name, n.Parent, n.LinkTo, n.Children = name, parent, nil, nil
		holder[t] = n
		inTree[n] = true
		return nil
	})
}
