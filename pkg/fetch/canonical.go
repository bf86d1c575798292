package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// checkCanonical refuses img (the image with digest d, parsed from the
// size bytes of r) unless it is canonical (cfs.CheckCanonical) or
// AllowNonCanonicalImages is set, and remembers a positive verdict. A
// refusal is logged with its reason and wraps cfs.ErrNotCanonical; the
// caller adds ErrInvalidImage (a final error).
func (s *Store) checkCanonical(ctx context.Context, d cfs.Digest, img *cfs.Image, r io.ReaderAt, size int64) error {
	if s.opts.AllowNonCanonicalImages || s.isCanonical(d) {
		return nil
	}
	if err := cfs.CheckCanonical(img, r, size); err != nil {
		if errors.Is(err, cfs.ErrNotCanonical) {
			klog.FromContext(ctx).Info("Image refused: not canonical (another writer made it, or it was crafted); the node flag --allow-noncanonical-images accepts such images",
				"digest", d.String(), "reason", err.Error())
		}
		return err
	}
	s.markCanonical(d)
	return nil
}

func (s *Store) markCanonical(d cfs.Digest) {
	s.mu.Lock()
	s.canonical[d] = true
	s.mu.Unlock()
}

func (s *Store) isCanonical(d cfs.Digest) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.canonical[d]
}

// storedImageCanonical checks a stored image this process has not found
// canonical yet (stored before a restart, or while the flag allowed other
// writers) before it serves a volume. A refused image stays in the store
// (it is intact: refusing it is policy); one whose content is not its name
// is quarantined (the caller then fetches it again); an unreadable one is
// left for the caller to find.
func (s *Store) storedImageCanonical(ctx context.Context, d cfs.Digest) error {
	if s.opts.AllowNonCanonicalImages || s.isCanonical(d) {
		return nil
	}
	f, err := s.openFile(s.ImagePath(d))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // gone meanwhile: fetched again
		}
		return fmt.Errorf("reading image %s: %w", d, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("reading image %s: %w", d, err)
	}
	mem, err := s.reserveParse(ctx, fi.Size())
	if err != nil {
		return err
	}
	defer mem.release()
	r := &readErrAt{r: f}
	img, _, err := parseImage(r, fi.Size(), math.MaxInt)
	if err == nil {
		mem.shrink(img.Stats().Memory) // what the check needs beyond the tree is in it
		err = s.checkCanonical(ctx, d, img, r, fi.Size())
	}
	if err != nil {
		if r.err != nil {
			return fmt.Errorf("reading image %s: %w", d, r.err)
		}
		// A file that is not the image its name says (a failing disk, a
		// tampered store) is quarantined and the image fetched again; only
		// an intact image is refused.
		got, _, herr := cfs.VerityDigestReader(io.NewSectionReader(r, 0, fi.Size()))
		switch {
		case r.err != nil:
			return fmt.Errorf("reading image %s: %w", d, r.err)
		case herr == nil && got != d:
			if _, qerr := s.quarantine(ctx, s.ImagePath(d), fmt.Sprintf("its content has digest %s (%v)", got, err)); qerr != nil {
				return qerr
			}
			return nil
		}
		return fmt.Errorf("image %s in the store: %w: %w", d, ErrInvalidImage, err)
	}
	return nil
}
