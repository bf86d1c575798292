package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// EnsureImage makes sure the image ref names is in the store and returns its
// digest. With ref.Digest set and the image present, the source is not
// contacted. Otherwise the image is downloaded (at most MaxImageSize bytes)
// while its digest is computed; a digest other than ref.Digest is refused
// and nothing is kept; the image is parsed with the strict reader before it
// is stored. Concurrent calls for the same ref share one download.
//
// With ForPrincipal (the only option it heeds), a stored image serves the
// call only once the principal has shown that it holds it: by having
// delivered it, or now, by src serving ref with the image's bytes (read
// whole and hashed, not stored); anything else (a refusal, a 404, a 200
// with other or no bytes) fails with ErrNotProven.
func (s *Store) EnsureImage(ctx context.Context, src Source, ref ImageRef, opts ...EnsureOption) (cfs.Digest, error) {
	var cfg ensureConfig
	for _, o := range opts {
		o(&cfg)
	}
	var pid *principalID
	if cfg.hasPrincipal {
		id := s.principalID(ctx, cfg.principal)
		pid = &id
	}
	if ref.Name == "" && ref.Digest.IsZero() {
		return cfs.Digest{}, errors.New("image reference: a name or a digest is needed")
	}
	if b, ok := src.(ImageBuilder); ok {
		d, err := s.ensureBuilt(ctx, b, ref, pid, cfg.progress)
		if err != nil {
			return cfs.Digest{}, fmt.Errorf("ensuring image %s from %s: %w", ref, src, err)
		}
		return d, nil
	}
	if !ref.Digest.IsZero() && s.HasImage(ref.Digest) {
		release := s.hold(ref.Digest)
		defer release()
		if err := s.storedImageVerity(ctx, ref.Digest); err != nil {
			return cfs.Digest{}, fmt.Errorf("ensuring image %s: %w", ref, err)
		}
		if err := s.storedImageCanonical(ctx, ref.Digest); err != nil {
			return cfs.Digest{}, fmt.Errorf("ensuring image %s: %w", ref, err)
		}
		_, err := s.Objects(ctx, ref.Digest)
		if errors.Is(err, ErrInvalidImage) {
			// It was valid when it was stored: the file is corrupt. Keep
			// it as evidence (as GC would) and fetch the image again.
			if _, qerr := s.quarantine(ctx, s.ImagePath(ref.Digest), err.Error()); qerr != nil && !errors.Is(qerr, fs.ErrNotExist) {
				return cfs.Digest{}, fmt.Errorf("ensuring image %s: %w", ref, qerr)
			}
		}
		if err == nil {
			if pid != nil && !s.isShown(shownKey{d: ref.Digest, image: true, p: *pid}) {
				err := s.proveImage(ctx, src, ref, ref.Digest, *pid)
				if err != nil && !errors.Is(err, fs.ErrNotExist) {
					return cfs.Digest{}, fmt.Errorf("ensuring image %s from %s: %w", ref, src, err)
				}
				if err == nil {
					s.touch(ref.Digest)
					return ref.Digest, nil
				}
				// Gone meanwhile: fetch it again.
			} else {
				s.touch(ref.Digest)
				return ref.Digest, nil
			}
		}
		// Corrupt, unreadable or gone meanwhile: fetch it again.
	}
	// Downloads are shared only by callers holding the same Source value
	// and acting for the same principal: a caller never rides on a
	// download made with someone else's credentials (the driver keeps one
	// Source per URL and credentials).
	key := fmt.Sprintf("%s\x00%p\x00%s", src.String(), src, ref.String())
	if pid != nil {
		key += fmt.Sprintf("\x00%x", pid[:])
	}
	d, _, err := s.images.do(ctx, key, func(ctx context.Context) (cfs.Digest, error) {
		return s.fetchImage(ctx, src, ref, pid)
	})
	if err != nil {
		return cfs.Digest{}, fmt.Errorf("ensuring image %s from %s: %w", ref, src, err)
	}
	return d, nil
}

// touch records a use of the image, in memory and as the file's mtime (the
// LRU order GC uses across restarts).
func (s *Store) touch(d cfs.Digest) {
	now := time.Now()
	s.mu.Lock()
	s.lastUse[d] = now
	s.mu.Unlock()
	_ = os.Chtimes(s.ImagePath(d), now, now)
}

func (s *Store) fetchImage(ctx context.Context, src Source, ref ImageRef, pid *principalID) (cfs.Digest, error) {
	log := klog.FromContext(ctx)
	var d cfs.Digest
	err := s.retry(ctx, "image "+ref.String(), func(ctx context.Context) error {
		var err error
		d, err = s.fetchImageOnce(ctx, src, ref, pid)
		return err
	})
	if err == nil {
		log.V(2).Info("image stored", "image", ref.String(), "digest", d.String(), "source", src.String())
	}
	return d, err
}

func (s *Store) fetchImageOnce(ctx context.Context, src Source, ref ImageRef, pid *principalID) (cfs.Digest, error) {
	room, err := s.reserveImageDownload(ctx)
	if err != nil {
		return cfs.Digest{}, err
	}
	defer room.release()
	actx, meter, stop := s.stallContext(ctx)
	defer stop()
	body, size, err := src.OpenImage(actx, ref)
	if err != nil {
		return cfs.Digest{}, s.stallError(ctx, actx, err)
	}
	defer body.Close()
	if size > s.opts.MaxImageSize {
		return cfs.Digest{}, fmt.Errorf("image is %d bytes, more than the limit of %d: %w", size, s.opts.MaxImageSize, ErrSizeMismatch)
	}
	if size >= 0 {
		room.shrink(size + 1)
	}
	f, err := os.CreateTemp(filepath.Join(s.root, tmpDir), "image-*")
	if err != nil {
		return cfs.Digest{}, fmt.Errorf("creating temporary file: %w", err)
	}
	defer func() {
		if f != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	h := cfs.NewVerityHash()
	n, err := s.copyBody(io.MultiWriter(f, h), meterReader{body, meter}, s.opts.MaxImageSize+1)
	if err != nil {
		return cfs.Digest{}, s.stallError(ctx, actx, err)
	}
	if n > s.opts.MaxImageSize {
		return cfs.Digest{}, fmt.Errorf("image is more than the limit of %d bytes: %w", s.opts.MaxImageSize, ErrSizeMismatch)
	}
	if size >= 0 && n != size {
		return cfs.Digest{}, Transient(fmt.Errorf("short read: got %d of %d bytes", n, size))
	}
	d := h.Digest()
	if !ref.Digest.IsZero() && d != ref.Digest {
		return cfs.Digest{}, fmt.Errorf("image has digest %s, want %s: %w", d, ref.Digest, ErrDigestMismatch)
	}
	mem, err := s.reserveParse(ctx, n)
	if err != nil {
		return cfs.Digest{}, err
	}
	// The tree may take at most what was reserved for it (the whole budget
	// for an image larger than it): a downloaded image is refused before
	// it takes more (cfs.ErrTooLarge), however many small entries its size
	// holds. Once parsed, the reservation shrinks to the tree's estimate,
	// which covers the canonical check too.
	img, objs, err := parseImageWithin(f, n, s.opts.MaxImageInodes, mem)
	if err == nil {
		mem.shrink(img.Stats().Memory)
		err = s.checkCanonical(ctx, d, img, f, n)
	}
	mem.release()
	switch {
	case errors.Is(err, cfs.ErrTooLarge):
		return cfs.Digest{}, fmt.Errorf("image %s: %w (the node's parse memory budget, --parse-memory): %w", d, err, ErrResourceLimit)
	case err != nil:
		return cfs.Digest{}, fmt.Errorf("image %s: %w: %w", d, ErrInvalidImage, err)
	}
	release, err := s.storeImageFile(ctx, &f, d, objs, pid)
	defer release()
	if err != nil {
		return cfs.Digest{}, err
	}
	s.c.imagesFetched.Add(1)
	s.c.imageBytesFetched.Add(uint64(n))
	return d, nil
}

// storeImageFile makes the verified temporary image file *f durable and
// renames it into place as image d with the objects objs, recording that
// pid showed it (when not nil); *f is nil once it was renamed. The image is
// held against GC until the returned release is called (also on error).
func (s *Store) storeImageFile(ctx context.Context, f **os.File, d cfs.Digest, objs []cfs.Object, pid *principalID) (release func(), err error) {
	if err := s.finishFile(*f, d); err != nil {
		return func() {}, err
	}
	release = s.hold(d)
	s.setIndex(d, objs)
	final := s.ImagePath(d)
	// Replacing a stored copy keeps who showed it.
	s.carryShown(final, (*f).Name())
	if pid != nil { // before the name: see fetchObject
		s.noteShown(shownKey{d: d, image: true, p: *pid})
	}
	if err := os.Rename((*f).Name(), final); err != nil {
		return release, fmt.Errorf("storing image %s: %w", d, err)
	}
	*f = nil
	if pid != nil {
		s.markShown(ctx, shownKey{d: d, image: true, p: *pid})
	}
	return release, s.syncDir(filepath.Dir(final))
}

// Objects returns the objects the stored image references (parsed once and
// cached: images are immutable).
func (s *Store) Objects(ctx context.Context, image cfs.Digest) ([]cfs.Object, error) {
	s.mu.Lock()
	objs, ok := s.index[image]
	s.mu.Unlock()
	if ok {
		return objs, nil
	}
	objs, err := s.parseStored(ctx, image)
	if err != nil {
		return nil, err
	}
	s.setIndex(image, objs)
	return objs, nil
}

func (s *Store) parseStored(ctx context.Context, image cfs.Digest) ([]cfs.Object, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f, err := s.openFile(s.ImagePath(image))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("image %s is not in the store: %w", image, ErrNotFound)
		}
		return nil, fmt.Errorf("reading image %s: %w", image, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("reading image %s: %w", image, err)
	}
	// No inode limit here: the image passed the limit in force when it was
	// downloaded, and failing it now would make GC quarantine an image
	// volumes use (and remove its objects).
	mem, err := s.reserveParse(ctx, fi.Size())
	if err != nil {
		return nil, err
	}
	r := &readErrAt{r: f}
	_, objs, err := parseImage(r, fi.Size(), math.MaxInt)
	mem.release()
	if err != nil {
		if r.err != nil {
			// The disk failed, not the image: not a reason to quarantine.
			return nil, fmt.Errorf("reading image %s: %w", image, r.err)
		}
		return nil, fmt.Errorf("image %s in the store: %w: %w", image, ErrInvalidImage, err)
	}
	return objs, nil
}

// readErrAt remembers the first read error other than EOF, to tell a
// failing disk from an invalid image.
type readErrAt struct {
	r   io.ReaderAt
	mu  sync.Mutex
	err error
}

func (r *readErrAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := r.r.ReadAt(p, off)
	if err != nil && err != io.EOF {
		r.mu.Lock()
		if r.err == nil {
			r.err = err
		}
		r.mu.Unlock()
	}
	return n, err
}

// parseImage validates an image with the strict reader (at most maxInodes
// inodes, 0 meaning the reader's default) and returns its objects, each
// named by digest.
func parseImage(r io.ReaderAt, size int64, maxInodes int) (*cfs.Image, []cfs.Object, error) {
	return parseImageWithin(r, size, maxInodes, nil)
}

// parseImageWithin is parseImage with the tree's estimated memory
// (cfs.OpenOptions.MaxMemory) bounded by what mem reserved from a bounded
// parse budget (nil, or no budget: unbounded).
func parseImageWithin(r io.ReaderAt, size int64, maxInodes int, mem *reservation) (*cfs.Image, []cfs.Object, error) {
	opts := cfs.OpenOptions{MaxInodes: maxInodes}
	if mem != nil && mem.b.sem != nil {
		opts.MaxMemory = max(mem.n, 1)
	}
	img, err := cfs.Open(r, size, opts)
	if err != nil {
		return nil, nil, err
	}
	objs := img.Objects()
	for _, o := range objs {
		if o.Digest.IsZero() {
			return nil, nil, fmt.Errorf("object %q is not named by a digest", o.Path)
		}
	}
	return img, objs, nil
}

// ImageStats parses the stored image (within the parse memory budget) and
// returns its summary.
func (s *Store) ImageStats(ctx context.Context, image cfs.Digest) (cfs.ImageStats, error) {
	f, err := os.Open(s.ImagePath(image))
	if err != nil {
		return cfs.ImageStats{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return cfs.ImageStats{}, err
	}
	mem, err := s.reserveParse(ctx, fi.Size())
	if err != nil {
		return cfs.ImageStats{}, err
	}
	defer mem.release()
	img, err := cfs.Open(f, fi.Size(), cfs.OpenOptions{})
	if err != nil {
		return cfs.ImageStats{}, fmt.Errorf("image %s: %w", image, err)
	}
	return img.Stats(), nil
}
