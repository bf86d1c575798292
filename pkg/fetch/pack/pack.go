// Package pack holds what both kinds of packed object sources share: the
// pack (a deterministic uncompressed tar of objects), the object index
// that says where each object is, and the planner that turns the objects
// a node lacks into coalesced single-range requests (docs/oci-artifact.md,
// "Object index" and "Packs"; README, "HTTP repository").
package pack

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// A pack is a deterministic, uncompressed tar of objects (docs/oci-artifact.md,
// "Packs"): the directory objects/, then for each two-hex prefix present
// the directory objects/xx/ and its objects objects/xx/<62 hex>, in digest
// order; every entry has mtime 0, uid and gid 0, no user or group names,
// mode 0755 (directories) or 0644 (files). Untarring every pack of an
// artifact gives a composefs object store.

// EntryName is the tar name of an object in a pack.
func EntryName(d cfs.Digest) string { return "objects/" + d.ObjectPath() }

// packHeaders returns the header of an object (or directory) entry.
func packHeader(name string, size int64, dir bool) *tar.Header {
	h := &tar.Header{Name: name, Size: size, Mode: 0o644, Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)}
	if dir {
		h.Mode, h.Typeflag, h.Size = 0o755, tar.TypeDir, 0
	}
	return h
}

// Writer writes one pack.
type Writer struct {
	cw     countingWriter
	tw     *tar.Writer
	prefix string // last objects/xx/ written
	last   cfs.Digest
	n      int
}

// NewWriter starts a pack on w.
func NewWriter(w io.Writer) (*Writer, error) {
	p := &Writer{cw: countingWriter{w: w}}
	p.tw = tar.NewWriter(&p.cw)
	if err := p.tw.WriteHeader(packHeader("objects/", 0, true)); err != nil {
		return nil, fmt.Errorf("writing pack: %w", err)
	}
	return p, nil
}

// Add writes object d (size bytes read from r) and returns where its bytes
// start in the pack. Objects must come in increasing digest order.
func (p *Writer) Add(d cfs.Digest, size int64, r io.Reader) (int64, error) {
	if p.n > 0 && bytes.Compare(p.last[:], d[:]) >= 0 {
		return 0, fmt.Errorf("writing pack: object %s out of order", d)
	}
	if pre := "objects/" + d.String()[:2] + "/"; pre != p.prefix {
		if err := p.tw.WriteHeader(packHeader(pre, 0, true)); err != nil {
			return 0, fmt.Errorf("writing pack: %w", err)
		}
		p.prefix = pre
	}
	if err := p.tw.WriteHeader(packHeader(EntryName(d), size, false)); err != nil {
		return 0, fmt.Errorf("writing pack: %w", err)
	}
	off := p.cw.n
	n, err := io.Copy(p.tw, io.LimitReader(r, size))
	if err != nil {
		return 0, fmt.Errorf("writing pack: object %s: %w", d, err)
	}
	if n != size {
		return 0, fmt.Errorf("writing pack: object %s: %d bytes, want %d", d, n, size)
	}
	p.last, p.n = d, p.n+1
	return off, nil
}

// Close ends the tar and returns the pack's size.
func (p *Writer) Close() (int64, error) {
	if err := p.tw.Close(); err != nil {
		return 0, fmt.Errorf("writing pack: %w", err)
	}
	return p.cw.n, nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}

// Size returns the size of a pack holding objects of the given sizes
// (in digest order), without writing it.
func Size(objs []cfs.Object) int64 {
	sorted := append([]cfs.Object(nil), objs...)
	sort.Slice(sorted, func(i, j int) bool { return bytes.Compare(sorted[i].Digest[:], sorted[j].Digest[:]) < 0 })
	n := int64(BlockSize) // objects/
	prefix := ""
	for _, o := range sorted {
		if pre := o.Digest.String()[:2]; pre != prefix {
			n += BlockSize
			prefix = pre
		}
		n += BlockSize + (int64(o.Size)+BlockSize-1)/BlockSize*BlockSize
	}
	// The end: two zero blocks, padded to tar's 10 KiB record.
	n += 2 * BlockSize
	const record = 20 * BlockSize
	return (n + record - 1) / record * record
}

// Write writes the pack of objs (in digest order) to w, reading each
// object with open and checking its content against its digest; it
// returns their offsets and the pack's size.
func Write(w io.Writer, objs []cfs.Object, open func(cfs.Object) (io.ReadCloser, error)) ([]int64, int64, error) {
	pw, err := NewWriter(w)
	if err != nil {
		return nil, 0, err
	}
	offs := make([]int64, len(objs))
	for i, o := range objs {
		rc, err := open(o)
		if err != nil {
			return nil, 0, fmt.Errorf("object %s: %w", o.Digest, err)
		}
		h := cfs.NewVerityHash()
		off, err := pw.Add(o.Digest, int64(o.Size), io.TeeReader(rc, h))
		rc.Close()
		if err != nil {
			return nil, 0, err
		}
		if got := h.Digest(); got != o.Digest {
			return nil, 0, fmt.Errorf("object %s: its content now has digest %s (changed while packing?)", o.Digest, got)
		}
		offs[i] = off
	}
	n, err := pw.Close()
	return offs, n, err
}

// Cut splits objs (in digest order) into the object lists of new packs,
// in order: a pack takes objects while their sizes, each with a tar
// header's block, stay within packSize; an object larger than packSize
// gets a pack of its own.
func Cut(objs []cfs.Object, packSize int64) [][]cfs.Object {
	var packs [][]cfs.Object
	for len(objs) > 0 {
		n, size := 0, int64(0)
		for n < len(objs) && (n == 0 || size+int64(objs[n].Size) <= packSize) {
			size += int64(objs[n].Size) + BlockSize
			n++
		}
		packs = append(packs, objs[:n:n])
		objs = objs[n:]
	}
	return packs
}
