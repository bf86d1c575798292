package cfs

import (
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
)

// This file walks the directory tree of an image depth first in stored
// (name) order, as the C reader does, and checks how inodes fit together:
// every directory is reached once ("." and ".." point at itself and its
// parent, no loops, no hardlinked directories), a hardlink's dirent type is
// its inode's, whiteouts 0:0 are hidden, nesting and inode counts are
// bounded; it turns each inode into what `composefs-info dump` shows
// (§2.15) and applies the redirect policy of OpenOptions. What it finds it
// hands to a visitor (the tree of Open, or DumpImage's output).

// Walk states of an nid: unseen, a non-directory seen (its dirent file
// type), a directory seen, a whiteout skipped; rdStMulti marks an inode
// that more than one entry names.
const (
	rdStUnseen  = 0
	rdStDir     = 8
	rdStSkipped = 9
	rdStMask    = 0x0f
	rdStMulti   = 0x10
	rdPageBits  = 12 // nids per page of the state table: 4096
)

// rdEntry is one entry of the tree as the walk hands it over; its slices
// are valid during the visit only.
type rdEntry struct {
	name      []byte // nil for the root
	depth     int    // 0 for the root
	direntIdx int    // index among the parent's stored dirents
	nid       uint64
	// alias: a hardlink to an inode an earlier entry named; the fields
	// below are unset.
	alias bool

	ino        *rdInode
	mode       uint32
	rdev       uint64
	size       uint64
	payload    []byte // symlink target, or a regular file's redirect without one '/'
	payloadStr string // the payload as a string, when the walk made one
	content    []byte
	digest     *Digest
	xattrs     []rdUserXattr // what composefs-info shows, in image order
}

// rdUserXattr is an xattr as composefs-info shows it: unescaped drops
// "overlay." after "trusted.overlay." (trusted.overlay.overlay.X is shown
// as trusted.overlay.X).
type rdUserXattr struct {
	x         *rdXattr
	unescaped bool
}

// appendKey appends the key as shown.
func (u rdUserXattr) appendKey(b []byte) []byte {
	start := len(b)
	b = u.x.appendKey(b)
	if u.unescaped {
		b = append(b[:start+len(rdOverlayPrefix)], b[start+len(rdOverlayEscPrefix):]...)
	}
	return b
}

type rdVisitor interface {
	// visit is called for every entry, a directory before its entries.
	visit(w *rdWalk, e *rdEntry) error
}

// rdWalk is one walk over an image.
type rdWalk struct {
	img   *Image
	p     *rdParser
	pages [][]byte // state of each nid, in pages allocated when touched
	path  []byte   // of the entry being visited: "" for the root, else "/a/b"
	visit rdVisitor
	// objects: collect img.objects (and check that each object is named
	// with one size).
	objects   bool
	objIndex  map[string]int32
	objChunks [][]Object
	nObjects  int32
	top       map[string]bool // when set, only these entries of the root
	e         rdEntry
	uxattrs   []rdUserXattr
}

func newWalk(img *Image, src *rdSource, v rdVisitor, objects bool) *rdWalk {
	w := &rdWalk{img: img, p: newParser(src, &img.sb), visit: v, objects: objects}
	w.pages = make([][]byte, (uint64(src.size)>>rdSlotBits)>>rdPageBits+1)
	if objects {
		w.objIndex = make(map[string]int32)
	}
	return w
}

// state returns the walk state of nid; an nid beyond the image is unseen
// (parsing it fails).
func (w *rdWalk) state(nid uint64) uint8 {
	if nid>>rdPageBits >= uint64(len(w.pages)) {
		return rdStUnseen
	}
	pg := w.pages[nid>>rdPageBits]
	if pg == nil {
		return rdStUnseen
	}
	return pg[nid&(1<<rdPageBits-1)]
}

func (w *rdWalk) setState(nid uint64, st uint8) {
	i := nid >> rdPageBits
	if w.pages[i] == nil {
		w.pages[i] = make([]byte, 1<<rdPageBits)
	}
	pg := w.pages[i]
	pg[nid&(1<<rdPageBits-1)] = pg[nid&(1<<rdPageBits-1)]&rdStMulti | st
}

func (w *rdWalk) markMulti(nid uint64) {
	w.pages[nid>>rdPageBits][nid&(1<<rdPageBits-1)] |= rdStMulti
}

// restart prepares a second walk over the same image: nids are unseen again
// but keep their rdStMulti marks; budgets and counts start afresh.
func (w *rdWalk) restart(v rdVisitor) {
	for _, pg := range w.pages {
		for i := range pg {
			pg[i] &= rdStMulti
		}
	}
	w.p.bud = rdNewBudget(w.p.src.size)
	w.img.stats = ImageStats{}
	w.visit = v
}

// pathString is the path of the current entry for messages.
func (w *rdWalk) pathString() string {
	if len(w.path) == 0 {
		return "/"
	}
	return string(w.path)
}

// run walks the whole tree from the root.
func (w *rdWalk) run() error {
	img := w.img
	nid := img.sb.rootNid
	w.path = w.path[:0]
	ri, err := w.p.parse(nid, 0)
	if err != nil {
		return fmt.Errorf("root: %w", err)
	}
	if ri.typ() != ModeDir {
		return fmt.Errorf("%w: root nid %d is not a directory (mode %#o)", ErrCorrupt, nid, ri.mode)
	}
	e := &w.e
	*e = rdEntry{nid: nid}
	if err := w.interpret(e, ri); err != nil {
		return err
	}
	if w.visit != nil {
		if err := w.visit.visit(w, e); err != nil {
			return err
		}
	}
	w.setState(nid, rdStDir)
	return w.dir(ri, nid, 0)
}

// dir walks the entries of directory ri, whose ".." must be parentNid.
func (w *rdWalk) dir(ri *rdInode, parentNid uint64, depth int) error {
	if depth > w.img.opts.MaxDepth {
		return fmt.Errorf("%w: %s: directories nested deeper than %d", ErrUnsupported, w.pathString(), w.img.opts.MaxDepth)
	}
	dirents := ri.dirents // in the parser's buffers of this depth
	for i := range dirents {
		de := &dirents[i]
		name := ri.name(de)
		switch string(name) {
		case ".":
			continue
		case "..":
			if de.nid != parentNid {
				return fmt.Errorf("%w: %s (nid %d): \"..\" points at nid %d, not the parent %d", ErrCorrupt, w.pathString(), ri.nid, de.nid, parentNid)
			}
			continue
		}
		if depth == 0 && w.top != nil && !w.top[string(name)] {
			continue
		}
		l := len(w.path)
		w.path = append(append(w.path, '/'), name...)
		err := w.entry(ri.nid, de, name, i, depth+1)
		w.path = w.path[:l]
		if err != nil {
			return err
		}
	}
	return nil
}

// entry handles one dirent of directory dirNid: the entry is at depth.
func (w *rdWalk) entry(dirNid uint64, de *rdDirent, name []byte, idx, depth int) error {
	st := &w.img.stats
	switch s := w.state(de.nid) & rdStMask; {
	case s == rdStDir:
		return fmt.Errorf("%w: %s: directory nid %d is reachable twice (directory loop or hardlinked directory)", ErrCorrupt, w.pathString(), de.nid)
	case s == rdStSkipped:
		return nil
	case s != rdStUnseen:
		if de.ft != s {
			return fmt.Errorf("%w: %s: dirent type %d does not match nid %d", ErrCorrupt, w.pathString(), de.ft, de.nid)
		}
		st.Hardlinks++
		st.Entries++
		w.markMulti(de.nid)
		if w.visit == nil {
			return nil
		}
		w.e = rdEntry{name: name, depth: depth, direntIdx: idx, nid: de.nid, alias: true}
		return w.visit.visit(w, &w.e)
	}
	ri, err := w.p.parse(de.nid, depth)
	if err != nil {
		return fmt.Errorf("%s: %w", w.pathString(), err)
	}
	if rdTypeOfDirent(de.ft) != ri.typ() {
		return fmt.Errorf("%w: %s: dirent type %d does not match the mode %#o of nid %d", ErrCorrupt, w.pathString(), de.ft, ri.mode, de.nid)
	}
	if ri.typ() == ModeChar && ri.u == 0 {
		// A real overlay whiteout (the 00..ff root entries): hidden, as
		// composefs-info does.
		w.setState(de.nid, rdStSkipped)
		return nil
	}
	e := &w.e
	*e = rdEntry{name: name, depth: depth, direntIdx: idx, nid: de.nid}
	if err := w.interpret(e, ri); err != nil {
		return err
	}
	if w.visit != nil {
		if err := w.visit.visit(w, e); err != nil {
			return err
		}
	}
	if ri.typ() == ModeDir {
		w.setState(de.nid, rdStDir)
		return w.dir(ri, dirNid, depth)
	}
	w.setState(de.nid, direntType(ri.mode))
	return nil
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

// interpret turns a raw inode into the entry composefs-info shows (§2.15),
// counts it, and applies the redirect policy.
func (w *rdWalk) interpret(e *rdEntry, ri *rdInode) error {
	img := w.img
	e.ino = ri
	e.mode, e.size = ri.mode, ri.size
	typ := ri.typ()
	if typ == ModeChar || typ == ModeBlock {
		e.rdev = uint64(ri.u)
	}
	whiteout := false
	xs := w.uxattrs[:0]
	for i := range ri.xattrs {
		x := &ri.xattrs[i]
		switch {
		case x.is(rdXattrRedirect), x.is(rdXattrMetacopy):
			// Interpreted below for regular files; dropped otherwise.
		case x.is(rdXattrEscWhiteout) && typ == ModeRegular:
			whiteout = true
		case x.is(rdXattrEscWhiteouts), x.is(rdXattrUserWhiteout), x.is(rdXattrUserWhiteouts):
		case x.hasPrefix(rdOverlayEscPrefix):
			xs = append(xs, rdUserXattr{x: x, unescaped: true})
		case x.hasPrefix(rdOverlayPrefix):
			// An unescaped overlay xattr (opaque=y, …): not user data.
		default:
			xs = append(xs, rdUserXattr{x: x})
		}
	}
	w.uxattrs = xs
	e.xattrs = xs
	st := &img.stats
	st.Entries++
	st.Inodes++
	if st.Inodes > uint64(img.opts.MaxInodes) {
		return fmt.Errorf("%w: more than the limit of %d inodes (OpenOptions.MaxInodes)", ErrUnsupported, img.opts.MaxInodes)
	}
	switch typ {
	case ModeSymlink:
		e.payload = ri.symlink
		st.Symlinks++
	case ModeDir:
		st.Dirs++
	case ModeChar, ModeBlock:
		st.Devices++
	case ModeFIFO, ModeSocket:
		st.Others++
	case ModeRegular:
		if whiteout {
			e.mode = e.mode&^ModeTypeMask | ModeChar
			e.rdev, e.size = 0, 0
			st.Whiteouts++
			return nil
		}
		st.Files++
		st.TotalFileBytes += ri.size
		if ri.layout != rdLayoutChunk {
			if len(ri.data) > 0 {
				e.content = ri.data
				st.InlineFiles++
				st.InlineBytes += ri.size
			}
			return nil
		}
		st.ExternalFiles++
		st.ExternalBytes += ri.size
		if ri.hasDigest {
			e.digest = &ri.digest
		}
		if !ri.hasRedirect && !img.opts.AllowForeignRedirects {
			// Overlay would look the file up by its own path in the data
			// layers, which an object store never holds: it reads EIO.
			return fmt.Errorf("%w: %s (nid %d): external file without a redirect to an object", ErrForeignRedirect, w.pathString(), ri.nid)
		}
		if ri.hasRedirect {
			e.payload = ri.redirect
			if len(e.payload) > 0 && e.payload[0] == '/' {
				e.payload = e.payload[1:]
			}
			return w.object(e, ri)
		}
	}
	return nil
}

// object applies the redirect policy and records the backing object.
func (w *rdWalk) object(e *rdEntry, ri *rdInode) error {
	img := w.img
	d, isDigest := rdObjectDigest(e.payload)
	if !img.opts.AllowForeignRedirects {
		if !isDigest || ri.redirect[0] != '/' || (len(ri.redirect) > 1 && ri.redirect[1] == '/') {
			return fmt.Errorf("%w: %s (nid %d): redirect %q", ErrForeignRedirect, w.pathString(), ri.nid, truncateForError(string(ri.redirect)))
		}
		if ri.hasDigest && ri.digest != d {
			return fmt.Errorf("%w: %s (nid %d): redirect %s, metacopy digest %s", ErrDigestMismatch, w.pathString(), ri.nid, e.payload, ri.digest)
		}
	}
	if !w.objects {
		return nil
	}
	if i, ok := w.objIndex[string(e.payload)]; ok {
		o := w.objectAt(i)
		if !img.opts.AllowForeignRedirects && o.Size != e.size {
			return fmt.Errorf("%w: %s (nid %d): object %s referenced with sizes %d and %d", ErrCorrupt, w.pathString(), ri.nid, e.payload, o.Size, e.size)
		}
		e.payloadStr = o.Path
		return nil
	}
	e.payloadStr = string(e.payload)
	o := Object{Path: e.payloadStr, Size: e.size}
	if isDigest {
		o.Digest = d
	}
	if len(w.objChunks) == 0 || len(w.objChunks[len(w.objChunks)-1]) == rdObjChunk {
		w.objChunks = append(w.objChunks, make([]Object, 0, rdObjChunk))
	}
	last := &w.objChunks[len(w.objChunks)-1]
	*last = append(*last, o)
	w.objIndex[o.Path] = w.nObjects
	w.nObjects++
	return nil
}

// Objects are collected in chunks (no copies as they grow) and joined in
// one slice at the end.
const rdObjChunk = 1024

func (w *rdWalk) objectAt(i int32) *Object {
	return &w.objChunks[i/rdObjChunk][i%rdObjChunk]
}

// takeObjects returns the objects collected, sorted by path (strcmp).
func (w *rdWalk) takeObjects() []Object {
	objs := make([]Object, 0, w.nObjects)
	for _, c := range w.objChunks {
		objs = append(objs, c...)
	}
	w.objChunks, w.objIndex = nil, nil
	slices.SortFunc(objs, func(a, b Object) int { return strings.Compare(a.Path, b.Path) })
	return objs
}

// rdObjectDigest parses an object-store path "xx/" + 62 lowercase hex
// characters, as ParseObjectPath does, without allocating.
func rdObjectDigest(p []byte) (Digest, bool) {
	var d Digest
	if len(p) != 2*DigestSize+1 || p[2] != '/' {
		return d, false
	}
	for i, c := range p {
		if i != 2 && (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return d, false
		}
	}
	var h [2 * DigestSize]byte
	copy(h[:2], p[:2])
	copy(h[2:], p[3:])
	if _, err := hex.Decode(d[:], h[:]); err != nil {
		return d, false
	}
	return d, true
}
