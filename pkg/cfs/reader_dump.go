package cfs

import (
	"bufio"
	"encoding/hex"
	"io"
	"strconv"
)

// DumpImage checks the composefs image of size bytes in r exactly as Open
// does, then writes it to w as a dumpfile, as WriteDump(w, img.Root())
// would, without building the tree: it walks the image twice (once to
// check it, once to write it) and keeps only the paths of inodes more than
// one entry names, so memory does not grow with the image. Nothing is
// written when the image is refused (only a read error during the second
// walk can end the output early).
//
// With top names, only those entries of the root (and what they hold) are
// dumped, as `composefs-info --filter` does: a hardlink's first path is
// then the first among the entries shown.
func DumpImage(w io.Writer, r io.ReaderAt, size int64, opts OpenOptions, top ...string) error {
	img, src, err := openHeaders(r, size, opts)
	if err != nil {
		return err
	}
	// The first walk checks everything (and, under the strict redirect
	// policy, that each object is named with one size) and marks inodes
	// with several entries.
	wk := newWalk(img, src, nil, !opts.AllowForeignRedirects)
	if err := wk.run(); err != nil {
		return err
	}
	wk.objects, wk.objIndex, wk.objChunks = false, nil, nil
	d := &rdDumper{bw: bufio.NewWriterSize(w, 64<<10), primaries: map[uint64]rdDumpPrimary{}}
	wk.restart(d)
	if len(top) > 0 {
		wk.top = make(map[string]bool, len(top))
		for _, name := range top {
			wk.top[name] = true
		}
	}
	if err := wk.run(); err != nil {
		return err
	}
	return d.bw.Flush()
}

// rdDumper writes each entry of a walk as a dumpfile line.
type rdDumper struct {
	bw        *bufio.Writer
	primaries map[uint64]rdDumpPrimary // inodes with several entries, by nid
	key       []byte
}

// rdDumpPrimary is an inode with several entries as shown at its first path.
type rdDumpPrimary struct {
	node *Node
	path string
}

func (d *rdDumper) visit(w *rdWalk, e *rdEntry) error {
	bw := d.bw
	if e.alias {
		t := d.primaries[e.nid]
		dwNodeLine(bw, w.path, true, t.node, t.path)
		return nil
	}
	ri := e.ino
	f := dwFields{size: e.size, mode: e.mode, nlink: ri.nlink, uid: ri.uid, gid: ri.gid, rdev: e.rdev, mtime: ri.mtime}
	dwPath(bw, w.path)
	dwWriteFields(bw, &f, false)
	dwOptional(bw, e.payload)
	dwOptional(bw, e.content)
	dwDigest(bw, e.digest)
	for _, u := range e.xattrs {
		bw.WriteByte(' ')
		d.key = u.appendKey(d.key[:0])
		dwEscape(bw, d.key, dwEscapeEqual)
		bw.WriteByte('=')
		dwEscape(bw, u.x.value, dwEscapeEqual)
	}
	bw.WriteByte('\n')
	if ri.typ() != ModeDir && w.state(e.nid)&rdStMulti != 0 {
		// Its other entries print this path and these fields.
		n := &Node{Mode: e.mode, Nlink: ri.nlink, UID: ri.uid, GID: ri.gid, Rdev: e.rdev, Size: e.size, Mtime: ri.mtime,
			Content: append([]byte(nil), e.content...)}
		if e.digest != nil {
			dg := *e.digest
			n.Digest = &dg
		}
		for _, u := range e.xattrs {
			n.Xattrs = append(n.Xattrs, Xattr{Key: string(u.appendKey(nil)), Value: append([]byte(nil), u.x.value...)})
		}
		d.primaries[e.nid] = rdDumpPrimary{node: n, path: w.pathString()}
	}
	return nil
}

// dwFields are the fields of a dump line between PATH and PAYLOAD.
type dwFields struct {
	size                  uint64
	mode, nlink, uid, gid uint32
	rdev                  uint64
	mtime                 Timespec
}

// dwPath writes an entry's path ("/" for the root).
func dwPath(bw *bufio.Writer, path []byte) {
	if len(path) == 0 {
		bw.WriteByte('/')
	} else {
		dwEscape(bw, path, 0)
	}
}

// dwWriteFields writes " SIZE MODE NLINK UID GID RDEV MTIME " (MODE with
// '@' for a hardlink alias).
func dwWriteFields(bw *bufio.Writer, f *dwFields, alias bool) {
	var num [24]byte
	bw.WriteByte(' ')
	bw.Write(strconv.AppendUint(num[:0], f.size, 10))
	bw.WriteByte(' ')
	if alias {
		bw.WriteByte('@')
	}
	bw.Write(strconv.AppendUint(num[:0], uint64(f.mode), 8))
	bw.WriteByte(' ')
	bw.Write(strconv.AppendUint(num[:0], uint64(f.nlink), 10))
	bw.WriteByte(' ')
	bw.Write(strconv.AppendUint(num[:0], uint64(f.uid), 10))
	bw.WriteByte(' ')
	bw.Write(strconv.AppendUint(num[:0], uint64(f.gid), 10))
	bw.WriteByte(' ')
	// composefs-info prints rdev as an unsigned int.
	bw.Write(strconv.AppendUint(num[:0], uint64(uint32(f.rdev)), 10))
	bw.WriteByte(' ')
	bw.Write(strconv.AppendInt(num[:0], f.mtime.Sec, 10))
	bw.WriteByte('.')
	bw.Write(strconv.AppendUint(num[:0], uint64(f.mtime.Nsec), 10))
	bw.WriteByte(' ')
}

func dwDigest(bw *bufio.Writer, d *Digest) {
	if d == nil {
		bw.WriteByte('-')
		return
	}
	var hx [2 * DigestSize]byte
	hex.Encode(hx[:], d[:])
	bw.Write(hx[:])
}
