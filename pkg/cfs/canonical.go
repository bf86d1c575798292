package cfs

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"slices"
)

// ErrNotCanonical is wrapped by CheckCanonical's error for an image whose
// bytes are not what the project's writer makes of its own tree.
var ErrNotCanonical = errors.New("not a canonical composefs image")

// CheckCanonical checks that the size bytes of r are exactly the image the
// writer makes from img's tree (img is r parsed by Open), at the version
// its header names: what mkcomposefs 1.0.8, composefs-rs (V1) and this
// project write. The kernel's EROFS parser then only ever sees bytes this
// project's writer could have produced from a tree the hardened reader
// accepted, however the image was crafted: padding, unused fields, block
// order, trailing bytes and any other freedom of the format are pinned.
// The error wraps ErrNotCanonical and names the first differing offset.
func CheckCanonical(img *Image, r io.ReaderAt, size int64) error {
	v := int(img.Version())
	if v > 1 {
		return fmt.Errorf("%w: composefs version %d", ErrNotCanonical, v)
	}
	cw := &compareWriter{r: r, size: size, diff: -1, buf: make([]byte, 256<<10)}
	root, err := writerInput(img, v)
	if err != nil {
		return err
	}
	_, err = WriteImage(cw, root, WriteOptions{MinVersion: v, MaxVersion: v})
	switch {
	case cw.diff >= 0:
		return fmt.Errorf("%w: byte %d (%s) differs from the writer's", ErrNotCanonical, cw.diff, imageRegion(cw.diff))
	case err != nil:
		if cw.readErr != nil {
			return fmt.Errorf("checking the image is canonical: reading it: %w", cw.readErr)
		}
		return fmt.Errorf("%w: its tree cannot be written again: %w", ErrNotCanonical, err)
	case cw.off != size:
		return fmt.Errorf("%w: %d bytes, the writer's image of its tree has %d", ErrNotCanonical, size, cw.off)
	}
	return nil
}

// writerInput returns the tree the writer needs to write img again: the
// reader's tree (composefs-info's interpretation) with two things the
// reader cannot give back as the writer's input had them.
//
//   - Which path of a hardlinked inode is its primary: the writer places
//     the inode where its primary comes in its breadth-first walk, so the
//     inode table's order tells it; the reader makes the first path it
//     meets the primary. The primaries are chosen again, for every inode in
//     nid order, as the first of its paths after the previous inode's.
//   - From version 1 on, the opaque "x" markers (trusted.overlay.opaque
//     and user.overlay.opaque) of a directory holding whiteouts: the
//     writer sets them on every such directory, overwriting any value the
//     tree has, so they are dropped.
//
// The image's tree is not modified: nodes that change are copied, with
// their ancestor directories. It fails when no choice of primaries gives
// the inode table's order (the image was not laid out by this writer).
func writerInput(img *Image, version int) (*Node, error) {
	repl, err := choosePrimaries(img)
	if err != nil {
		return nil, err
	}
	return rebuildTree(img.Root(), repl, version), nil
}

// choosePrimaries returns, for each hardlinked inode whose primary must
// move, the nodes that replace its paths' entries.
func choosePrimaries(img *Image) (map[*Node]*Node, error) {
	if img.Stats().Hardlinks == 0 {
		return nil, nil
	}
	// The entries in the writer's order: directories breadth first, each
	// one's children by name.
	var order []*Node
	queue := []*Node{img.Root()}
	for len(queue) > 0 {
		d := queue[0]
		queue = queue[1:]
		for _, ch := range d.Children {
			order = append(order, ch)
			if ch.LinkTo == nil && ch.Mode&ModeTypeMask == ModeDir {
				queue = append(queue, ch)
			}
		}
	}
	type inodePaths struct {
		nid    uint64
		target *Node
		pos    []int // positions in order, ascending
	}
	byTarget := make(map[*Node]*inodePaths, len(order))
	var inodes []*inodePaths
	for i, n := range order {
		t := n.Target()
		ip, ok := byTarget[t]
		if !ok {
			nid, found := img.Nid(t)
			if !found {
				return nil, fmt.Errorf("%w: %s has no inode", ErrNotCanonical, n.Path())
			}
			ip = &inodePaths{nid: nid, target: t}
			byTarget[t] = ip
			inodes = append(inodes, ip)
		}
		ip.pos = append(ip.pos, i)
	}
	slices.SortFunc(inodes, func(a, b *inodePaths) int { return cmp.Compare(a.nid, b.nid) })
	var repl map[*Node]*Node
	last := -1
	for _, ip := range inodes {
		k, _ := slices.BinarySearch(ip.pos, last+1)
		if k == len(ip.pos) {
			return nil, fmt.Errorf("%w: the inode of %s (nid %d) is out of the writer's order", ErrNotCanonical, ip.target.Path(), ip.nid)
		}
		last = ip.pos[k]
		primary := order[last]
		if primary.LinkTo == nil {
			continue // the reader's primary is the writer's
		}
		if repl == nil {
			repl = make(map[*Node]*Node)
		}
		np := *ip.target
		np.Name, np.Parent, np.LinkTo = primary.Name, primary.Parent, nil
		repl[primary] = &np
		for _, q := range ip.pos {
			if a := order[q]; a != primary {
				repl[a] = &Node{Name: a.Name, Parent: a.Parent, LinkTo: &np}
			}
		}
	}
	return repl, nil
}

// rebuildTree returns n with the entries in repl replaced and, from
// version 1 on, the writer's opaque markers dropped; unchanged subtrees
// are n's own.
func rebuildTree(n *Node, repl map[*Node]*Node, version int) *Node {
	if r, ok := repl[n]; ok {
		return r
	}
	if n.LinkTo != nil || n.Mode&ModeTypeMask != ModeDir {
		return n
	}
	var children []*Node // copied on the first change
	hasWhiteout := false
	for i, ch := range n.Children {
		if ch.LinkTo == nil && ch.Mode&ModeTypeMask == ModeChar && ch.Rdev == 0 {
			hasWhiteout = true
		}
		if nc := rebuildTree(ch, repl, version); nc != ch {
			if children == nil {
				children = append([]*Node(nil), n.Children...)
			}
			children[i] = nc
		}
	}
	xattrs := n.Xattrs
	if version >= 1 && hasWhiteout {
		kept := make([]Xattr, 0, len(xattrs))
		for _, x := range xattrs {
			if (x.Key == xattrTrustedOverlay+"opaque" || x.Key == "user.overlay.opaque") && string(x.Value) == "x" {
				continue
			}
			kept = append(kept, x)
		}
		xattrs = kept
	}
	if children == nil && len(xattrs) == len(n.Xattrs) {
		return n
	}
	c := *n
	if children != nil {
		c.Children = children
	}
	c.Xattrs = xattrs
	return &c
}

// imageRegion names the part of an image an offset falls in, for errors.
func imageRegion(off int64) string {
	switch {
	case off < cfsHeaderLength:
		return "composefs header"
	case off < 1024:
		return "padding before the superblock"
	case off < 1024+128:
		return "EROFS superblock"
	}
	return fmt.Sprintf("block %d", off/4096)
}

var errDiffers = errors.New("differs")

// compareWriter compares what is written with the bytes of r, stopping at
// the first difference.
type compareWriter struct {
	r       io.ReaderAt
	size    int64
	off     int64
	diff    int64 // first differing offset, or -1
	readErr error
	buf     []byte
}

func (c *compareWriter) Write(p []byte) (int, error) {
	if c.diff >= 0 {
		return 0, errDiffers
	}
	n := 0
	for len(p) > 0 {
		if c.off >= c.size {
			c.diff = c.size // the writer's image is longer
			return n, errDiffers
		}
		k := min(len(p), len(c.buf), int(c.size-c.off))
		m, err := c.r.ReadAt(c.buf[:k], c.off)
		if m < k {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			c.readErr = err
			return n, err
		}
		if !bytes.Equal(c.buf[:k], p[:k]) {
			for i := range k {
				if c.buf[i] != p[i] {
					c.diff = c.off + int64(i)
					break
				}
			}
			return n, errDiffers
		}
		c.off += int64(k)
		n += k
		p = p[k:]
	}
	return n, nil
}
