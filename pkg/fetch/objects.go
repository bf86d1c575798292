package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// Stats tell what one EnsureObjects call found and did.
type Stats struct {
	Objects int    // distinct objects the image needs
	Bytes   uint64 // their total size

	Present      int // already in the store
	PresentBytes uint64
	Extra        int // found in an extra read-only object directory
	ExtraBytes   uint64
	Fetched      int // downloaded by this call
	FetchedBytes uint64
	Shared       int // downloaded by a concurrent call (another volume)
	SharedBytes  uint64
	// Proven objects were in the store (or shared) but new to the call's
	// principal, whose source showed it holds them (ForPrincipal);
	// ProofBytes is what the proofs received.
	Proven      int
	ProvenBytes uint64
	ProofBytes  uint64
	// RunOverheadBytes were received but are no object's: what a RunSource's
	// requests carry between objects (tar headers, gaps between runs of
	// missing objects), and objects that arrived meanwhile.
	RunOverheadBytes uint64
}

// SavedBytes is what the node did not download thanks to deduplication.
func (st Stats) SavedBytes() uint64 { return st.PresentBytes + st.ExtraBytes + st.SharedBytes }

// Progress is updated live by EnsureObjects when given WithProgress; read
// its fields from another goroutine to show progress.
type Progress struct {
	Objects      atomic.Int64 // objects the image needs
	Bytes        atomic.Int64 // their size
	DoneObjects  atomic.Int64 // present or fetched so far
	DoneBytes    atomic.Int64
	FetchObjects atomic.Int64 // objects to download (known after the scan)
	FetchBytes   atomic.Int64
	Fetched      atomic.Int64 // bytes received so far
}

// EnsureOption tunes one EnsureObjects call.
type EnsureOption func(*ensureConfig)

type ensureConfig struct {
	progress     *Progress
	principal    string
	hasPrincipal bool
}

// WithProgress makes EnsureObjects update p as it goes, and EnsureImage
// when it converts an image (the layer bytes received, the objects written).
func WithProgress(p *Progress) EnsureOption { return func(c *ensureConfig) { c.progress = p } }

// EnsureObjects makes sure every object the stored image references is in
// the store or in an extra object directory, downloading only the missing
// ones from src, at most Parallelism at a time (and at most
// MaxConcurrentDownloads across all calls). A stored object of another size
// than the image records fails the call (the image is wrong: the object's
// name is its digest) and is left in place. Each download is streamed to
// an anonymous O_TMPFILE file (a named one under tmp/ where the filesystem
// has no O_TMPFILE) through the fs-verity hasher, must have the size the
// image records and the digest its name says, gets fs-verity where
// supported, is made durable (a group syncfs) and is then linked (or
// renamed) into objects/. The first permanent failure (or
// exhausted retries) stops the call and is returned, naming the object.
//
// With ForPrincipal, an object in the store that the principal has neither
// delivered nor shown before (including one a concurrent call downloaded
// from another source) is used only once src proves that it holds it
// (proof.go); a failed proof fails the call with ErrNotProven, naming the
// object. Objects of the extra directories are the host's, public to every
// volume, and need no proof.
func (s *Store) EnsureObjects(ctx context.Context, src Source, image cfs.Digest, opts ...EnsureOption) (Stats, error) {
	var cfg ensureConfig
	for _, o := range opts {
		o(&cfg)
	}
	p := cfg.progress
	if p == nil {
		p = new(Progress)
	}
	var st Stats
	var pid *principalID
	if cfg.hasPrincipal {
		id := s.principalID(ctx, cfg.principal)
		pid = &id
	}
	// Hold the image before looking at anything, so that GC keeps it and
	// every object it references from now on.
	release := s.hold(image)
	defer release()
	objs, err := s.Objects(ctx, image)
	if err != nil {
		return st, err
	}

	st.Objects = len(objs)
	for _, o := range objs {
		st.Bytes += o.Size
	}
	p.Objects.Store(int64(st.Objects))
	p.Bytes.Store(int64(st.Bytes))

	var missing, unproven []cfs.Object
	for _, o := range objs {
		if err := ctx.Err(); err != nil {
			return st, fmt.Errorf("ensuring objects of image %s: %w", image, context.Cause(ctx))
		}
		where, err := s.locate(ctx, o)
		if err != nil {
			return st, fmt.Errorf("ensuring objects of image %s: %w", image, err)
		}
		switch where {
		case inStore:
			switch {
			case pid == nil || s.isShown(shownKey{d: o.Digest, p: *pid}):
				st.Present++
				st.PresentBytes += o.Size
			case s.inExtraDir(o): // the host's, public: no proof
				st.Extra++
				st.ExtraBytes += o.Size
			default:
				unproven = append(unproven, o)
				continue
			}
		case inExtra:
			st.Extra++
			st.ExtraBytes += o.Size
		default:
			missing = append(missing, o)
			p.FetchObjects.Add(1)
			p.FetchBytes.Add(int64(o.Size))
			continue
		}
		p.DoneObjects.Add(1)
		p.DoneBytes.Add(int64(o.Size))
	}
	if _, built := src.(ImageBuilder); built && len(unproven) > 0 && s.isShown(shownKey{d: image, image: true, p: *pid}) {
		// The principal showed it holds the image's layers (or converted
		// them itself): that covers every object of the image.
		for _, o := range unproven {
			st.Proven++
			st.ProvenBytes += o.Size
			p.DoneObjects.Add(1)
			p.DoneBytes.Add(int64(o.Size))
		}
		unproven = nil
	}
	if len(unproven) > 0 {
		if err := s.proveObjects(ctx, src, unproven, *pid, &st, p); err != nil {
			return st, fmt.Errorf("ensuring objects of image %s from %s: %w", image, src, err)
		}
	}
	s.c.objectsDeduplicated.Add(uint64(st.Present + st.Extra + st.Proven))
	s.c.bytesDeduplicated.Add(st.PresentBytes + st.ExtraBytes + st.ProvenBytes)
	if len(missing) == 0 {
		return st, nil
	}
	if err := s.admitObjects(missing); err != nil {
		return st, fmt.Errorf("ensuring objects of image %s: %w", image, err)
	}

	var (
		recheck []cfs.Object
		dirs    map[string]bool
	)
	if rs, ok := src.(RunSource); ok {
		recheck, dirs, err = s.fetchRuns(ctx, src, rs, image, missing, p, pid, &st)
	} else {
		recheck, dirs, err = s.fetchEach(ctx, src, missing, p, pid, &st)
	}
	if err != nil {
		if ctx.Err() != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("%w (%w)", context.Cause(ctx), err)
		}
		return st, fmt.Errorf("ensuring objects of image %s from %s: %w", image, src, err)
	}
	if len(dirs) > 0 {
		// One more group sync makes the renames durable (rather than one
		// fsync per object directory).
		if err := s.durable.wait(ctx); err != nil {
			return st, fmt.Errorf("ensuring objects of image %s: %w", image, err)
		}
	}
	if len(recheck) > 0 {
		proven, provenBytes := st.Proven, st.ProvenBytes
		if err := s.proveObjects(ctx, src, recheck, *pid, &st, p); err != nil {
			return st, fmt.Errorf("ensuring objects of image %s from %s: %w", image, src, err)
		}
		s.c.objectsDeduplicated.Add(uint64(st.Proven - proven))
		s.c.bytesDeduplicated.Add(st.ProvenBytes - provenBytes)
	}
	s.c.objectsDeduplicated.Add(uint64(st.Shared))
	s.c.bytesDeduplicated.Add(st.SharedBytes)
	klog.FromContext(ctx).V(2).Info("objects ensured", "image", image.String(), "objects", st.Objects,
		"fetched", st.Fetched, "fetchedBytes", st.FetchedBytes, "savedBytes", st.SavedBytes())
	return st, nil
}

// fetchEach downloads each missing object with its own request, sharing
// downloads with concurrent calls. It returns the objects a concurrent
// call brought in (to prove, with a principal) and the object directories
// written.
func (s *Store) fetchEach(ctx context.Context, src Source, missing []cfs.Object, p *Progress, pid *principalID, st *Stats) ([]cfs.Object, map[string]bool, error) {
	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		mu       sync.Mutex
		firstErr error
		dirs     = make(map[string]bool)
		wg       sync.WaitGroup
		next     atomic.Int64
		// recheck: objects this call did not download itself (a
		// concurrent call did, perhaps from another source).
		recheck []cfs.Object
	)
	// At most Parallelism downloads run at once (slots); more workers than
	// that keep the slots busy while finished downloads wait for the group
	// sync that makes them durable before they are renamed into place.
	slots := make(chan struct{}, s.opts.Parallelism)
	workers := min(waitersPerSlot*s.opts.Parallelism, len(missing))
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(missing) || wctx.Err() != nil {
					return
				}
				o := missing[i]
				// Keyed by digest and size: a request recording a wrong
				// size fails alone rather than failing its sharers.
				key := fmt.Sprintf("%s/%d", o.Digest, o.Size)
				res, shared, err := s.objects.do(wctx, key, func(fctx context.Context) (objectResult, error) {
					return s.fetchObject(fctx, src, o, p, slots, pid)
				})
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = err
						cancel(err)
					}
					mu.Unlock()
					return
				}
				if res.dir != "" {
					dirs[res.dir] = true
				}
				if pid != nil && res.found != inExtra && (shared || res.fetched == 0) && !s.isShown(shownKey{d: o.Digest, p: *pid}) {
					recheck = append(recheck, o)
					mu.Unlock()
					continue
				}
				switch {
				case shared:
					st.Shared++
					st.SharedBytes += o.Size
				case res.found == inExtra:
					st.Extra++
					st.ExtraBytes += o.Size
				case res.fetched == 0: // arrived meanwhile
					st.Present++
					st.PresentBytes += o.Size
				default:
					st.Fetched++
					st.FetchedBytes += res.fetched
				}
				mu.Unlock()
				p.DoneObjects.Add(1)
				p.DoneBytes.Add(int64(o.Size))
			}
		}()
	}
	wg.Wait()
	return recheck, dirs, firstErr
}

type location int

const (
	missingObject location = iota
	inStore
	inExtra
)

// locate finds an object in the store or in an extra dir. It never moves
// or removes anything: the size an image records is the claim of a request
// (of a possibly hostile image), while a stored object's name is its
// fs-verity digest, which pins its content and so its size. A stored
// object of another size than the image records therefore means the image
// is wrong, and the call fails with ErrSizeMismatch and ErrInvalidImage.
// Only Verify, which re-hashes, quarantines corrupt objects.
func (s *Store) locate(ctx context.Context, o cfs.Object) (location, error) {
	path := s.objectPath(o.Digest)
	if fi, err := lstatVerity(path); err == nil {
		if !fi.regular {
			return missingObject, fmt.Errorf("object %s: %s is not a regular file (the store is damaged; verification quarantines it)", o.Digest, path)
		}
		if uint64(fi.size) != o.Size {
			return missingObject, fmt.Errorf("object %s: the image records %d bytes but the object with that digest has %d: %w: %w",
				o.Digest, o.Size, fi.size, ErrSizeMismatch, ErrInvalidImage)
		}
		if fi.verity || !s.verity.Load() {
			return inStore, nil
		}
		// Stored without fs-verity on a store that has it now: a mount
		// with verity=require could not read it. Enable it (the kernel
		// hashes the file once); content that is not its name goes to
		// quarantine and is fetched again.
		ok, err := s.addVerity(ctx, path, o.Digest)
		if err != nil {
			return missingObject, fmt.Errorf("object %s: %w", o.Digest, err)
		}
		if ok {
			return inStore, nil
		}
	}
	if s.inExtraDir(o) {
		return inExtra, nil
	}
	return missingObject, nil
}

// inExtraDir reports whether an extra object directory has o.
func (s *Store) inExtraDir(o cfs.Object) bool {
	for _, dir := range s.opts.ExtraObjectDirs {
		fi, err := os.Stat(filepath.Join(dir, o.Digest.ObjectPath()))
		if err == nil && fi.Mode().IsRegular() && uint64(fi.Size()) == o.Size {
			return true
		}
	}
	return false
}

// waitersPerSlot is how many objects per download slot an EnsureObjects
// call works on at once: downloading, or waiting to be made durable.
const waitersPerSlot = 4

// fetchObject downloads o into the store, holding one of slots while it
// downloads.
func (s *Store) fetchObject(ctx context.Context, src Source, o cfs.Object, p *Progress, slots chan struct{}, pid *principalID) (objectResult, error) {
	if where, err := s.locate(ctx, o); err != nil {
		return objectResult{}, err
	} else if where != missingObject { // arrived while we queued
		return objectResult{found: where}, nil
	}
	var res objectResult
	err := s.retry(ctx, "object "+o.Digest.String(), func(ctx context.Context) error {
		var err error
		res, err = s.fetchObjectOnce(ctx, src, o, p, slots)
		return err
	})
	if err != nil {
		return res, fmt.Errorf("object %s (%d bytes): %w", o.Digest, o.Size, err)
	}
	if pid != nil {
		s.markShown(ctx, shownKey{d: o.Digest, p: *pid})
	}
	return res, nil
}

func (s *Store) fetchObjectOnce(ctx context.Context, src Source, o cfs.Object, p *Progress, slots chan struct{}) (objectResult, error) {
	f, err := s.downloadObject(ctx, src, o, p, slots)
	if err != nil {
		return objectResult{}, err
	}
	dir, err := s.publishObject(ctx, f, o)
	if err != nil {
		return objectResult{}, err
	}
	return objectResult{fetched: o.Size, dir: dir}, nil
}

// publishObject makes a complete, verified temporary object durable and
// gives it its name; it returns the object directory (to sync). f is
// closed or discarded in every case.
func (s *Store) publishObject(ctx context.Context, f *tempFile, o cfs.Object) (string, error) {
	defer func() {
		if f != nil {
			f.discard()
		}
	}()
	if err := s.prepareTemp(f, o.Digest); err != nil {
		return "", err
	}
	if err := s.durable.wait(ctx); err != nil {
		return "", fmt.Errorf("storing object %s: %w", o.Digest, err)
	}
	final := s.objectPath(o.Digest)
	err := f.publish(final)
	f = nil
	if err != nil {
		return "", fmt.Errorf("storing object %s: %w", o.Digest, err)
	}
	s.c.objectsFetched.Add(1)
	s.c.objectBytesFetched.Add(o.Size)
	return filepath.Dir(final), nil
}

// downloadObject streams o into a new file under tmp/ through the fs-verity
// hasher, holding one of slots meanwhile, and checks its size and digest.
// The returned file is complete and verified but not yet durable; on error
// nothing is left behind.
func (s *Store) downloadObject(ctx context.Context, src Source, o cfs.Object, p *Progress, slots chan struct{}) (*tempFile, error) {
	select {
	case slots <- struct{}{}:
		defer func() { <-slots }()
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
	// Then one of the node-wide slots, shared by all calls.
	select {
	case s.downloads <- struct{}{}:
		defer func() { <-s.downloads }()
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
	// Then room in tmp/, held until the file is published or discarded.
	room, err := s.admitObjectDownload(ctx, o)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			room.release()
		}
	}()
	actx, meter, stop := s.stallContext(ctx)
	defer stop()
	body, err := src.OpenObject(actx, o.Digest, o.Size)
	if err != nil {
		return nil, s.stallError(ctx, actx, err)
	}
	defer body.Close()
	f, err := s.receiveObject(objectLocation(src, o.Digest), o, meterReader{body, meter}, p, room)
	if err != nil {
		return nil, s.stallError(ctx, actx, err)
	}
	return f, nil
}

// receiveObject streams o's bytes from body (at most one more than its
// size is read) into a new file under tmp/ through the fs-verity hasher,
// and checks its size and digest; where names the source of the bytes in
// errors. The returned file is complete and verified but not yet durable;
// on error nothing is left behind.
//
// room is the object's reservation in the download budget: the file holds
// it until it leaves tmp/ (published or discarded).
func (s *Store) receiveObject(where string, o cfs.Object, body io.Reader, p *Progress, room *reservation) (_ *tempFile, err error) {
	// Anonymous (O_TMPFILE) where the filesystem allows. Named temporary
	// files are spread over 16 directories: one directory for all would
	// serialise every create and rename on its lock.
	f, err := s.createTemp(filepath.Join(s.root, tmpDir, o.Digest.String()[:1]), "object-"+o.Digest.String()[:16]+"-*")
	if err != nil {
		return nil, fmt.Errorf("creating temporary file: %w", err)
	}
	f.room = room
	var n int64
	defer func() {
		if err != nil {
			p.Fetched.Add(-n)
			f.discard()
		}
	}()
	h := cfs.NewVerityHash()
	wf := &writebackFile{f: f.File}
	n, err = s.copyBody(io.MultiWriter(wf, h, progressWriter{&p.Fetched}), body, int64(o.Size)+1)
	if err != nil {
		return nil, err
	}
	if uint64(n) != o.Size {
		if uint64(n) < o.Size {
			return nil, Transient(fmt.Errorf("%s: short read: got %d of %d bytes", where, n, o.Size))
		}
		return nil, fmt.Errorf("%s: more than the %d bytes the image records: %w", where, o.Size, ErrSizeMismatch)
	}
	if got := h.Digest(); got != o.Digest {
		return nil, fmt.Errorf("%s: content has digest %s: %w", where, got, ErrDigestMismatch)
	}
	wf.startWriteback()
	return f, nil
}

// copyBody copies at most limit bytes. Read errors are transient (resets,
// truncation); write errors (disk full) are not.
func (s *Store) copyBody(w io.Writer, r io.Reader, limit int64) (int64, error) {
	bp := s.bufs.Get().(*[]byte)
	defer s.bufs.Put(bp)
	buf := *bp
	var n int64
	for n < limit {
		want := int64(len(buf))
		if limit-n < want {
			want = limit - n
		}
		m, rerr := r.Read(buf[:want])
		if m > 0 {
			if _, werr := w.Write(buf[:m]); werr != nil {
				return n, fmt.Errorf("writing to the store: %w", werr)
			}
			n += int64(m)
		}
		if rerr == io.EOF {
			return n, nil
		}
		if rerr != nil {
			if errors.Is(rerr, context.Canceled) || errors.Is(rerr, context.DeadlineExceeded) {
				return n, rerr
			}
			return n, Transient(rerr)
		}
	}
	return n, nil
}

type progressWriter struct{ n *atomic.Int64 }

func (w progressWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(len(p)))
	return len(p), nil
}
