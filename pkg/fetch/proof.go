package fetch

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// ErrNotProven: the node has the content, but the volume's source (with the
// volume's credentials) did not show that it holds it: it refused, lacks
// it, or served other bytes. Permanent; the driver answers PermissionDenied.
var ErrNotProven = errors.New("possession not proven")

// Proofs of possession.
//
// An image is small and is what names everything else, so its proof is the
// strongest: the source must serve, under the volume's image name, bytes
// with the image's digest (the whole image is read and hashed, not stored).
//
// An object is proved by one request. Objects of at most proofWholeMax
// bytes are asked for whole and hashed: such small files are where secrets
// usually live (keys, tokens, configuration), and a partial proof of them
// would be weak. Larger objects are asked for one 4 KiB block with a
// single-range GET (Range: bytes=a-b), compared with the stored bytes; a
// server that ignores Range answers 200 with the whole object, which is
// hashed instead.
//
// Strength: a server with none of the object (the attacks this defeats:
// naming digests it learnt somewhere) fails. A server that knows a fraction
// f of an object's blocks passes with probability f; only reading the whole
// object closes that, at the cost of downloading it again, which is what the
// store exists to avoid. Two choices keep f honest:
//   - the block is not uniform (all one byte) when one follows it within
//     1 MiB (wrapping around): zero padding and holes are guessable;
//   - the block is chosen by an HMAC of the object's digest under the
//     store's secret key, not at random per attempt: the same object gets
//     the same challenge on this node every time, so retrying a publish
//     (kubelet retries forever) cannot draw blocks until a known one comes.
//
// Cost for a principal's first use of content it did not deliver: one
// request per object and min(size, 16 KiB) or 4 KiB of body. Content the
// principal fetched itself, or showed once, costs nothing (provenance.go).
const (
	proofBlock    = 4096
	proofWholeMax = 16 << 10
	// proofScan bounds how many blocks (1 MiB) are read, from the chosen
	// one on, to find one that is not uniform.
	proofScan = 256
)

// RangeSource is implemented by sources that can serve part of an object.
type RangeSource interface {
	// OpenObjectRange asks for n bytes at off of the object d (size bytes
	// long). whole reports that the source sent the whole object instead
	// (it ignores ranges); otherwise the body is exactly the range.
	OpenObjectRange(ctx context.Context, d cfs.Digest, size uint64, off, n int64) (body io.ReadCloser, whole bool, err error)
}

// proofCounters count proofs and what they cost.
type proofCounters struct {
	proofs, proofBytes, proofsFailed atomic.Uint64
}

// proofError is a failed proof; it wraps ErrNotProven and the cause.
type proofError struct {
	what, src string
	err       error
}

func (e *proofError) Error() string {
	return fmt.Sprintf("%s is on this node, but %s did not show that it holds it for this volume's credentials: %v", e.what, e.src, e.err)
}

func (e *proofError) Unwrap() []error { return []error{ErrNotProven, e.err} }

// notProven wraps why a proof failed. Transient failures (retries
// exhausted) and cancellation pass through unchanged: they say nothing
// about possession. A size other than the object's is an answer, though a
// download would retry it (a truncating cache).
func notProven(what string, src Source, err error) error {
	var pe *proofError
	if err == nil || errors.As(err, &pe) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	if IsTransient(err) && !errors.Is(err, ErrSizeMismatch) {
		return err
	}
	return &proofError{what: what, src: src.String(), err: err}
}

// proveImage checks that src serves ref with the stored image's bytes.
func (s *Store) proveImage(ctx context.Context, src Source, ref ImageRef, d cfs.Digest, p principalID) error {
	fi, err := os.Stat(s.ImagePath(d))
	if err != nil {
		return fmt.Errorf("image %s: %w", d, err)
	}
	want := fi.Size()
	var got int64
	err = s.retry(ctx, "proof of image "+ref.String(), func(ctx context.Context) error {
		actx, meter, stop := s.stallContext(ctx)
		defer stop()
		body, size, err := src.OpenImage(actx, ref)
		if err != nil {
			return s.stallError(ctx, actx, err)
		}
		defer body.Close()
		if size >= 0 && size != want {
			return fmt.Errorf("it announces %d bytes under that name, the image has %d", size, want)
		}
		h := cfs.NewVerityHash()
		n, err := s.copyBody(h, meterReader{body, meter}, want+1)
		got += n
		if err != nil {
			return s.stallError(ctx, actx, err)
		}
		if size >= 0 && n < size {
			return Transient(fmt.Errorf("short read: got %d of %d bytes", n, size))
		}
		if dg := h.Digest(); n != want || dg != d {
			return fmt.Errorf("it serves %d bytes with digest %s under that name", n, dg)
		}
		return nil
	})
	s.proofs.proofBytes.Add(uint64(got))
	if err != nil {
		err = notProven("image "+d.String(), src, err)
		if errors.Is(err, ErrNotProven) {
			s.proofs.proofsFailed.Add(1)
		}
		return err
	}
	s.proofs.proofs.Add(1)
	s.markShown(ctx, shownKey{d: d, image: true, p: p})
	return nil
}

// proveObjects proves possession of objs, at most Parallelism at a time
// (each holding a node-wide download slot), recording each success. The
// first failure stops the others and is returned.
func (s *Store) proveObjects(ctx context.Context, src Source, objs []cfs.Object, p principalID, st *Stats, prog *Progress) error {
	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		mu       sync.Mutex
		firstErr error
		next     atomic.Int64
		wg       sync.WaitGroup
	)
	for range min(s.opts.Parallelism, len(objs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(objs) || wctx.Err() != nil {
					return
				}
				o := objs[i]
				n, err := s.proveObject(wctx, src, o, p)
				mu.Lock()
				st.ProofBytes += uint64(n)
				if err != nil {
					if firstErr == nil {
						firstErr = err
						cancel(err)
					}
					mu.Unlock()
					return
				}
				st.Proven++
				st.ProvenBytes += o.Size
				mu.Unlock()
				prog.DoneObjects.Add(1)
				prog.DoneBytes.Add(int64(o.Size))
			}
		}()
	}
	wg.Wait()
	if firstErr != nil && ctx.Err() != nil && !errors.Is(firstErr, context.Canceled) && !errors.Is(firstErr, context.DeadlineExceeded) {
		firstErr = fmt.Errorf("%w (%w)", context.Cause(ctx), firstErr)
	}
	return firstErr
}

// proveObject proves that src holds o and records it; it returns the bytes
// received.
func (s *Store) proveObject(ctx context.Context, src Source, o cfs.Object, p principalID) (int64, error) {
	select {
	case s.downloads <- struct{}{}:
		defer func() { <-s.downloads }()
	case <-ctx.Done():
		return 0, context.Cause(ctx)
	}
	var got int64
	err := s.retry(ctx, "proof of object "+o.Digest.String(), func(ctx context.Context) error {
		n, err := s.proveObjectOnce(ctx, src, o)
		got += n
		return err
	})
	s.proofs.proofBytes.Add(uint64(got))
	if err != nil {
		err = notProven(fmt.Sprintf("object %s (%d bytes)", o.Digest, o.Size), src, err)
		if errors.Is(err, ErrNotProven) {
			s.proofs.proofsFailed.Add(1)
		}
		return got, err
	}
	s.proofs.proofs.Add(1)
	s.markShown(ctx, shownKey{d: o.Digest, p: p})
	return got, nil
}

func (s *Store) proveObjectOnce(ctx context.Context, src Source, o cfs.Object) (int64, error) {
	actx, meter, stop := s.stallContext(ctx)
	defer stop()
	rs, ranged := src.(RangeSource)
	if !ranged || o.Size <= proofWholeMax {
		body, err := src.OpenObject(actx, o.Digest, o.Size)
		if err != nil {
			return 0, s.stallError(ctx, actx, err)
		}
		defer body.Close()
		return s.proveWhole(ctx, actx, src, o, meterReader{body, meter})
	}
	off, want, err := s.challenge(ctx, o)
	if err != nil {
		return 0, err
	}
	body, whole, err := rs.OpenObjectRange(actx, o.Digest, o.Size, off, int64(len(want)))
	if err != nil {
		return 0, s.stallError(ctx, actx, err)
	}
	defer body.Close()
	if whole {
		return s.proveWhole(ctx, actx, src, o, meterReader{body, meter})
	}
	var buf bytes.Buffer
	n, err := s.copyBody(&buf, meterReader{body, meter}, int64(len(want))+1)
	if err != nil {
		return n, s.stallError(ctx, actx, err)
	}
	if !bytes.Equal(buf.Bytes(), want) {
		return n, fmt.Errorf("%s: bytes %d-%d differ from the object's (%d bytes received)",
			objectLocation(src, o.Digest), off, off+int64(len(want))-1, n)
	}
	return n, nil
}

// proveWhole hashes a whole object served by src.
func (s *Store) proveWhole(ctx, actx context.Context, src Source, o cfs.Object, body io.Reader) (int64, error) {
	h := cfs.NewVerityHash()
	n, err := s.copyBody(h, body, int64(o.Size)+1)
	if err != nil {
		return n, s.stallError(ctx, actx, err)
	}
	if uint64(n) < o.Size {
		return n, Transient(fmt.Errorf("%s: short read: got %d of %d bytes", objectLocation(src, o.Digest), n, o.Size))
	}
	if got := h.Digest(); uint64(n) != o.Size || got != o.Digest {
		return n, fmt.Errorf("%s: serves %d bytes with digest %s", objectLocation(src, o.Digest), n, got)
	}
	return n, nil
}

// challenge picks the block of o a source must serve, and reads it from
// the stored object: from a block chosen by an HMAC of the digest under
// the store's key, the first one that is not uniform (within proofScan
// blocks; the chosen one if all are).
func (s *Store) challenge(ctx context.Context, o cfs.Object) (int64, []byte, error) {
	f, err := os.Open(s.objectPath(o.Digest))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, nil, fmt.Errorf("object %s left the store during its proof: %w", o.Digest, err)
		}
		return 0, nil, fmt.Errorf("reading object %s: %w", o.Digest, err)
	}
	defer f.Close()
	blocks := (o.Size + proofBlock - 1) / proofBlock
	m := hmac.New(sha256.New, s.provenanceKey(ctx))
	m.Write([]byte("challenge\x00"))
	m.Write(o.Digest[:])
	start := binary.BigEndian.Uint64(m.Sum(nil)) % blocks
	read := func(i uint64) (int64, []byte, error) {
		off := int64(i * proofBlock)
		buf := make([]byte, min(proofBlock, o.Size-uint64(off)))
		if _, err := f.ReadAt(buf, off); err != nil {
			return 0, nil, fmt.Errorf("reading object %s: %w", o.Digest, err)
		}
		return off, buf, nil
	}
	for k := uint64(0); k < min(blocks, proofScan); k++ {
		off, buf, err := read((start + k) % blocks)
		if err != nil || !uniform(buf) {
			return off, buf, err
		}
	}
	return read(start)
}

func uniform(b []byte) bool {
	for _, c := range b {
		if c != b[0] {
			return false
		}
	}
	return true
}
