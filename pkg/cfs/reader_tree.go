package cfs

import "fmt"

// rdTree builds the Node tree of Open from a walk. Nodes, digests, child
// pointers and byte values are carved from larger slabs, the names of a
// directory's entries from one string per directory, and xattr keys and
// shared values are kept once per image: the tree costs little more than
// its fields.
type rdTree struct {
	img       *Image
	parents   []*Node   // the directory being filled at each depth
	names     []rdNames // the entry names of that directory
	primaries map[uint64]*Node
	keys      map[string]string
	shared    map[uint32][]byte // values of shared xattrs, by id
	key       []byte

	nodes   []Node
	digests []Digest
	ptrs    []*Node
	xattrs  []Xattr
	arena   []byte

	mem int64 // the estimated memory of the tree so far (charge)
}

// rdNames holds the names of one directory's stored entries: entry i is
// s[off[i]:off[i+1]].
type rdNames struct {
	s   string
	off []int32
	buf []byte
}

const rdSlab = 256

func newTree(img *Image) *rdTree {
	return &rdTree{img: img, primaries: map[uint64]*Node{}, keys: map[string]string{}, shared: map[uint32][]byte{}}
}

func (t *rdTree) newNode() *Node {
	if len(t.nodes) == 0 {
		t.nodes = make([]Node, rdSlab)
	}
	n := &t.nodes[0]
	t.nodes = t.nodes[1:]
	return n
}

// bytes returns a copy of b from the arena (nil for nil).
func (t *rdTree) bytes(b []byte) []byte {
	if b == nil {
		return nil
	}
	if len(b) > 4096 {
		return append([]byte(nil), b...)
	}
	if len(t.arena) < len(b) {
		t.arena = make([]byte, 64<<10)
	}
	c := t.arena[:len(b):len(b)]
	copy(c, b)
	t.arena = t.arena[len(b):]
	return c
}

func (t *rdTree) children(n int) []*Node {
	if n > rdSlab {
		return make([]*Node, 0, n)
	}
	if len(t.ptrs) < n {
		t.ptrs = make([]*Node, 4*rdSlab)
	}
	c := t.ptrs[:0:n]
	t.ptrs = t.ptrs[n:]
	return c
}

func (t *rdTree) xattrSlice(n int) []Xattr {
	if n > rdSlab {
		return make([]Xattr, n)
	}
	if len(t.xattrs) < n {
		t.xattrs = make([]Xattr, rdSlab)
	}
	c := t.xattrs[:n:n]
	t.xattrs = t.xattrs[n:]
	return c
}

func (t *rdTree) visit(w *rdWalk, e *rdEntry) error {
	if err := t.charge(w, e); err != nil {
		return err
	}
	n := t.newNode()
	n.nid = e.nid
	if e.depth > 0 {
		parent := t.parents[e.depth-1]
		names := &t.names[e.depth-1]
		n.Name = names.s[names.off[e.direntIdx]:names.off[e.direntIdx+1]]
		n.Parent = parent
		parent.Children = append(parent.Children, n)
	} else {
		t.img.root = n
	}
	if e.alias {
		n.nid = 0
		n.LinkTo = t.primaries[e.nid]
		return nil
	}
	ri := e.ino
	n.Mode, n.Nlink, n.UID, n.GID = e.mode, ri.nlink, ri.uid, ri.gid
	n.Rdev, n.Size, n.Mtime = e.rdev, e.size, ri.mtime
	switch {
	case e.payloadStr != "":
		n.Payload = e.payloadStr
	case len(e.payload) > 0:
		n.Payload = string(e.payload)
	}
	if len(e.content) > 0 {
		n.Content = t.bytes(e.content)
	}
	if e.digest != nil {
		if len(t.digests) == 0 {
			t.digests = make([]Digest, rdSlab)
		}
		t.digests[0] = *e.digest
		n.Digest = &t.digests[0]
		t.digests = t.digests[1:]
	}
	if len(e.xattrs) > 0 {
		n.Xattrs = t.xattrSlice(len(e.xattrs))
		for i, u := range e.xattrs {
			t.key = u.appendKey(t.key[:0])
			k, ok := t.keys[string(t.key)]
			if !ok {
				k = string(t.key)
				t.keys[k] = k
			}
			var v []byte
			if u.x.shared {
				if v, ok = t.shared[u.x.id]; !ok {
					v = t.bytes(u.x.value)
					t.shared[u.x.id] = v
				}
			} else {
				v = t.bytes(u.x.value)
			}
			n.Xattrs[i] = Xattr{Key: k, Value: v}
		}
	}
	if ri.typ() != ModeDir {
		t.primaries[e.nid] = n
		return nil
	}
	// A directory: its entries come next.
	for len(t.parents) <= e.depth {
		t.parents = append(t.parents, nil)
		t.names = append(t.names, rdNames{})
	}
	t.parents[e.depth] = n
	names := &t.names[e.depth]
	names.buf = names.buf[:0]
	names.off = append(names.off[:0], 0)
	for i := range ri.dirents {
		names.buf = append(names.buf, ri.name(&ri.dirents[i])...)
		names.off = append(names.off, int32(len(names.buf)))
	}
	names.s = string(names.buf)
	n.Children = t.children(max(len(ri.dirents)-2, 0))
	return nil
}

// Estimated memory of a tree (the reader's) and of writing it again (the
// canonical check), per entry: an inode's entry (a Node, the writer's
// inode and dirent, the check's bookkeeping), a hard link's (a Node, a
// dirent, the check's bookkeeping), and per byte of an entry's name,
// payload, inline content and xattrs (kept by the reader, copied or
// referenced by the writer). BenchmarkCanonicalMemory and
// TestMemoryEstimate measure the real peak against it.
const (
	memPerInode = 680
	memPerAlias = 400
	memPerByte  = 3
	memPerXattr = 128 // an Xattr in the reader's and the writer's slices
	// A file backed by an object: its digest, its entry in the object
	// list, and the writer's metacopy and redirect xattrs (kept in its
	// table of xattrs to share).
	memPerExternal = 640
)

// MaxMemoryPerByte bounds the memory estimate of an image
// (ImageStats.Memory) per byte of it: a hard link's entry is estimated at
// 400 bytes plus 3 per byte of its name for 12 bytes of dirent and its
// name; an xattr, shared (a reference of 4 bytes) or inline (at least 4
// bytes), at 128 bytes plus 3 per byte of its name. So a caller may
// reserve MaxMemoryPerByte × size before Open and give that as MaxMemory
// without refusing any image that fits. The fuzz target of Open checks it.
const MaxMemoryPerByte = 32

// charge adds the estimated memory of e to the tree's and refuses
// it past OpenOptions.MaxMemory, before anything of e is built.
func (t *rdTree) charge(w *rdWalk, e *rdEntry) error {
	c := int64(memPerAlias) + memPerByte*int64(len(e.name))
	if !e.alias {
		c = int64(memPerInode) + memPerByte*int64(len(e.name)+max(len(e.payload), len(e.payloadStr))+len(e.content))
		for _, u := range e.xattrs {
			c += memPerXattr + memPerByte*int64(len(u.x.name))
			if _, seen := t.shared[u.x.id]; !u.x.shared || !seen {
				c += memPerByte * int64(len(u.x.value)) // a shared value is kept once
			}
		}
		if e.mode&ModeTypeMask == ModeRegular && e.size > 0 && len(e.content) == 0 {
			c += memPerExternal
		}
	}
	t.mem += c
	t.img.stats.Memory = t.mem
	if max := t.img.opts.MaxMemory; max > 0 && t.mem > max {
		return fmt.Errorf("%w: at %s, parsing the image and checking it canonical would take more than the limit of %d bytes of memory (OpenOptions.MaxMemory)", ErrTooLarge, w.pathString(), max)
	}
	return nil
}
