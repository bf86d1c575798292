package fetch

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// partialObject is an object download in progress across attempts: the
// bytes received so far are in the temporary file and, in the same order,
// in the fs-verity hasher, whose streaming state (the Merkle tree's leaves
// and levels so far) stands for exactly those bytes. An attempt cut short
// keeps them; the next one asks the source for the rest only (a Range
// request from the first byte missing) and feeds it to the same hasher, so
// the digest checked at the end covers every byte, old and new. A source
// that ignores the range sends the whole object again, and the download
// starts over.
type partialObject struct {
	f       *tempFile
	wf      *writebackFile
	h       *cfs.VerityHash
	n       int64 // bytes received, written and hashed
	resumed bool  // part of the bytes came from a range request
}

// newPartial reserves room for o in tmp/ and creates its temporary file.
func (s *Store) newPartial(ctx context.Context, o cfs.Object) (*partialObject, error) {
	room, err := s.admitObjectDownload(ctx, o)
	if err != nil {
		return nil, err
	}
	return s.createPartial(o, room)
}

// createPartial creates the temporary file of o's download, which holds
// room (released on error).
func (s *Store) createPartial(o cfs.Object, room *reservation) (*partialObject, error) {
	// Anonymous (O_TMPFILE) where the filesystem allows. Named temporary
	// files are spread over 16 directories: one directory for all would
	// serialise every create and rename on its lock.
	f, err := s.createTemp(filepath.Join(s.root, tmpDir, o.Digest.String()[:1]), "object-"+o.Digest.String()[:16]+"-*")
	if err != nil {
		room.release()
		return nil, fmt.Errorf("creating temporary file: %w", err)
	}
	f.room = room
	return &partialObject{f: f, wf: &writebackFile{f: f.File}, h: getVerityHash()}, nil
}

// verityHashers are the fs-verity hashers of downloads (one per download
// in flight), reused rather than allocated per object: a hasher keeps a
// 4 KiB block per Merkle tree level and as much again to finish a digest,
// which was most of what a pull allocated (150 of 240 MB for 6,000
// objects) and so most of its garbage collection.
var verityHashers = sync.Pool{New: func() any { return cfs.NewVerityHash() }}

func getVerityHash() *cfs.VerityHash {
	h := verityHashers.Get().(*cfs.VerityHash)
	h.Reset()
	return h
}

// doneHashing gives the hasher back once the download needs it no more.
func (pt *partialObject) doneHashing() {
	if pt.h != nil {
		verityHashers.Put(pt.h)
		pt.h = nil
	}
}

// discard removes the partial download (nil: nothing to do) and takes its
// bytes out of the progress.
func (pt *partialObject) discard(p *Progress) {
	if pt == nil {
		return
	}
	p.Fetched.Add(-pt.n)
	pt.doneHashing()
	pt.f.discard()
}

// restart empties the partial download, to receive the whole object.
func (pt *partialObject) restart(p *Progress) error {
	if pt.n == 0 {
		return nil
	}
	if err := pt.f.Truncate(0); err != nil {
		return fmt.Errorf("restarting a download: %w", err)
	}
	if _, err := pt.f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("restarting a download: %w", err)
	}
	p.Fetched.Add(-pt.n)
	pt.h.Reset()
	pt.wf.off, pt.wf.started = 0, 0
	pt.n, pt.resumed = 0, false
	return nil
}

// openRest opens what o still lacks: the whole object, or the rest from
// the first missing byte where the source serves ranges.
func (s *Store) openRest(ctx context.Context, src Source, o cfs.Object, pt *partialObject, p *Progress) (io.ReadCloser, error) {
	rs, ranged := src.(RangeSource)
	if pt.n > 0 && ranged && uint64(pt.n) < o.Size {
		body, whole, err := rs.OpenObjectRange(ctx, o.Digest, o.Size, pt.n, int64(o.Size)-pt.n)
		if err != nil {
			return nil, err
		}
		if !whole {
			pt.resumed = true
			s.c.resumes.Add(1)
			s.c.resumedBytes.Add(uint64(pt.n))
			return body, nil
		}
		// The source ignored the range: this is the whole object.
		if err := pt.restart(p); err != nil {
			body.Close()
			return nil, err
		}
		return body, nil
	}
	if err := pt.restart(p); err != nil {
		return nil, err
	}
	return src.OpenObject(ctx, o.Digest, o.Size)
}

// receiveRest streams the rest of o from body (at most one byte more than
// it lacks is read) into the partial download, counting the bytes into
// received too (when not nil), and checks the size and digest once body ends; where names
// the source of the bytes in errors. On a transient error the partial
// download keeps what arrived, for the next attempt. A digest mismatch of
// a resumed download empties it and is transient: the next attempt
// fetches the whole object, whose digest is then final.
func (s *Store) receiveRest(where func() string, o cfs.Object, body io.Reader, p *Progress, pt *partialObject, received *atomic.Int64) (*tempFile, error) {
	n, err := s.copyBody(&receiveWriter{pt: pt, fetched: &p.Fetched, received: received}, body, int64(o.Size)-pt.n+1)
	pt.n += n
	if err != nil {
		return nil, err
	}
	if uint64(pt.n) != o.Size {
		if uint64(pt.n) < o.Size {
			return nil, Transient(fmt.Errorf("%s: short read: got %d of %d bytes", where(), pt.n, o.Size))
		}
		return nil, fmt.Errorf("%s: more than the %d bytes the image records: %w", where(), o.Size, ErrSizeMismatch)
	}
	if got := pt.h.Digest(); got != o.Digest {
		if pt.resumed {
			if err := pt.restart(p); err != nil {
				return nil, err
			}
			return nil, Transient(fmt.Errorf("%s: content has digest %s after resuming; fetching it whole", where(), got))
		}
		return nil, fmt.Errorf("%s: content has digest %s: %w", where(), got, ErrDigestMismatch)
	}
	pt.doneHashing()
	if pt.wf.started > 0 {
		// A large object: start the writeback of its tail too. A small
		// one (under writebackChunk) is left to the group sync, whose
		// writeback of many files at once costs less CPU than a
		// sync_file_range per file.
		pt.wf.startWriteback()
	}
	return pt.f, nil
}

// receiveWriter writes received bytes to the partial download's file and
// hasher and counts them into the progress (and received, when not nil).
type receiveWriter struct {
	pt       *partialObject
	fetched  *atomic.Int64
	received *atomic.Int64
}

func (w *receiveWriter) Write(b []byte) (int, error) {
	n, err := w.pt.wf.Write(b)
	if err != nil {
		return n, err
	}
	w.pt.h.Write(b)
	w.fetched.Add(int64(len(b)))
	if w.received != nil {
		w.received.Add(int64(len(b)))
	}
	return len(b), nil
}
