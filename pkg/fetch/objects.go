package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

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

	// Objects named in the store from now on by anyone but this call: if
	// none, a missing object found by the scan is still missing when its
	// download starts (see fetchEach).
	scan := &sinceScan{at: s.named.Load()}
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
		recheck, dirs, err = s.fetchRuns(ctx, src, rs, image, missing, scan, p, pid, &st)
	} else {
		recheck, dirs, err = s.fetchEach(ctx, src, missing, scan, p, pid, &st)
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
// downloads with concurrent calls, in interleaved order (largest and
// smallest alternately) and as many at once as the link rewards
// (adaptiveLimit, at most Parallelism; MaxConcurrentDownloads node-wide).
// Each object has a goroutine while it downloads or waits for the group
// sync that makes it durable: at most waitersPerSlot per download slot of
// the call, and MaxFetchWorkers node-wide. It returns the objects a
// concurrent call brought in (to prove, with a principal) and the object
// directories written.
//
// An object is looked up again before its download (a concurrent call
// may have stored it meanwhile) only when some other call has named an
// object since the scan found it missing.
func (s *Store) fetchEach(ctx context.Context, src Source, missing []cfs.Object, scan *sinceScan, p *Progress, pid *principalID, st *Stats) ([]cfs.Object, map[string]bool, error) {
	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		mu       sync.Mutex
		firstErr error
		dirs     = make(map[string]bool)
		wg       sync.WaitGroup
		// recheck: objects this call did not download itself (a
		// concurrent call did, perhaps from another source).
		recheck []cfs.Object
	)
	lim := newAdaptiveLimit(s.opts.Parallelism, nil, klog.FromContext(ctx))
	if sl, ok := src.(interface{ MaxInFlight() int }); ok {
		lim.inFlight = sl.MaxInFlight
	}
	for _, o := range interleave(missing) {
		if err := lim.acquireWorker(wctx); err != nil {
			break
		}
		took := false
		select {
		case s.workers <- struct{}{}:
			took = true
		case <-wctx.Done():
		}
		if wctx.Err() != nil {
			if took { // taken as the call ended: give it back
				<-s.workers
			}
			lim.releaseWorker()
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-s.workers; lim.releaseWorker() }()
			// Keyed by digest and size: a request recording a wrong
			// size fails alone rather than failing its sharers.
			key := o.Digest.String() + "/" + strconv.FormatUint(o.Size, 10)
			res, shared, err := s.objects.do(wctx, key, func(fctx context.Context) (objectResult, error) {
				res, err := s.fetchObject(fctx, src, o, p, lim, pid, scan.others(s))
				if err == nil && res.fetched > 0 {
					scan.own.Add(1)
				}
				return res, err
			})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = err
					cancel(err)
				}
				return
			}
			if res.dir != "" {
				dirs[res.dir] = true
			}
			if pid != nil && res.found != inExtra && (shared || res.fetched == 0) && !s.isShown(shownKey{d: o.Digest, p: *pid}) {
				recheck = append(recheck, o)
				return
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
			p.DoneObjects.Add(1)
			p.DoneBytes.Add(int64(o.Size))
		}()
	}
	wg.Wait()
	if firstErr == nil && wctx.Err() != nil {
		firstErr = context.Cause(wctx)
	}
	klog.FromContext(ctx).V(3).Info("objects downloaded", "objects", len(missing), "concurrency", lim.current())
	return recheck, dirs, firstErr
}

// sinceScan tells whether an object the scan of a call found missing may
// have been stored since by another call.
type sinceScan struct {
	at  uint64        // s.named at the scan
	own atomic.Uint64 // objects the call named since (counted after each is named)
}

// others reports whether a call other than the scan's named an object
// since the scan. own is read first: publishObject counts named before
// the call counts own, so equal counts mean no one else named anything.
func (c *sinceScan) others(s *Store) bool {
	mine := c.own.Load()
	return s.named.Load() != c.at+mine
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
	s.lookups.Add(1)
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

// fetchObject downloads o into the store, holding a download slot of lim
// while it downloads. A download cut short (a reset, a stall, a short
// body) is resumed by the next attempt where the source serves ranges.
//
// With recheck, o is looked up first (it may have arrived while the call
// queued it); without, the caller knows that nothing was named since it
// found o missing.
func (s *Store) fetchObject(ctx context.Context, src Source, o cfs.Object, p *Progress, lim *adaptiveLimit, pid *principalID, recheck bool) (objectResult, error) {
	if recheck {
		if where, err := s.locate(ctx, o); err != nil {
			return objectResult{}, err
		} else if where != missingObject { // arrived while we queued
			return objectResult{found: where}, nil
		}
	}
	var (
		res  objectResult
		part *partialObject
	)
	defer func() { part.discard(p) }()
	err := s.retryWith(ctx, "object "+o.Digest.String(), lim.backOff, func(ctx context.Context) error {
		f, err := s.downloadObject(ctx, src, o, p, lim, &part)
		if err != nil {
			return err
		}
		if pid != nil {
			// The source has delivered these verified bytes: record it
			// before the object gets its name, so that a concurrent call
			// of the same principal finding it stored needs no proof.
			s.noteShown(shownKey{d: o.Digest, p: *pid})
		}
		dir, err := s.publishObject(ctx, f, o)
		if err != nil {
			return err
		}
		res = objectResult{fetched: o.Size, dir: dir}
		return nil
	})
	if err != nil {
		return res, fmt.Errorf("object %s (%d bytes): %w", o.Digest, o.Size, err)
	}
	if pid != nil {
		s.markShown(ctx, shownKey{d: o.Digest, p: *pid})
	}
	return res, nil
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
	s.named.Add(1)
	if s.afterPublish != nil {
		s.afterPublish(o.Digest)
	}
	s.c.objectsFetched.Add(1)
	s.c.objectBytesFetched.Add(o.Size)
	return filepath.Dir(final), nil
}

// downloadObject streams o into a file under tmp/ through the fs-verity
// hasher, holding a download slot of lim and a node-wide one meanwhile,
// and checks its size and digest. *part is the download so far: nil on
// the first attempt, and what an attempt cut short leaves for the next
// one to resume. The returned file is complete and verified but not yet
// durable (and *part is then nil).
func (s *Store) downloadObject(ctx context.Context, src Source, o cfs.Object, p *Progress, lim *adaptiveLimit, part **partialObject) (*tempFile, error) {
	if err := lim.acquire(ctx); err != nil {
		return nil, err
	}
	defer lim.release()
	// Then one of the node-wide slots, shared by all calls.
	select {
	case s.downloads <- struct{}{}:
		defer func() { <-s.downloads }()
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
	if *part == nil {
		pt, err := s.newPartial(ctx, o)
		if err != nil {
			return nil, err
		}
		*part = pt
	}
	pt := *part
	actx, meter, stop := s.stallContext(ctx)
	defer stop()
	t0 := time.Now()
	body, err := s.openRest(actx, src, o, pt, p)
	if err != nil {
		return nil, s.stallError(ctx, actx, err)
	}
	lim.observeRTT(time.Since(t0))
	defer body.Close()
	where := func() string { return objectLocation(src, o.Digest) }
	f, err := s.receiveRest(where, o, meterReader{body, meter}, p, pt, &lim.received)
	if err != nil {
		return nil, err
	}
	*part = nil
	return f, nil
}

// receiveObject streams o's bytes from body (at most one more than its
// size is read) into a new file under tmp/ through the fs-verity hasher,
// and checks its size and digest; where names the source of the bytes in
// errors (called only then). The returned file is complete and verified but not yet durable;
// on error nothing is left behind (a run source's requests are not
// resumed object by object).
//
// room is the object's reservation in the download budget: the file holds
// it until it leaves tmp/ (published or discarded).
func (s *Store) receiveObject(where func() string, o cfs.Object, body io.Reader, p *Progress, room *reservation) (*tempFile, error) {
	pt, err := s.createPartial(o, room)
	if err != nil {
		return nil, err
	}
	f, err := s.receiveRest(where, o, body, p, pt, nil)
	if err != nil {
		pt.discard(p)
		return nil, err
	}
	return f, nil
}

// Copy buffers: each download in flight holds one; objects up to 16 KiB
// take the small one. Using the small one for HTTP/2 bodies too (whose
// reads hand out frames from memory) was measured and dropped: the file
// writes of 16 KiB cost a cold pull of the mixed tree 0.9 s more system
// CPU, and peak RSS was no lower.
const (
	copyBufferSize      = 64 << 10
	smallCopyBufferSize = 16 << 10
)

// copyBody copies at most limit bytes. Read errors are transient (resets,
// truncation); write errors (disk full) are not. Reads fill the copy buffer
// before it is written (and hashed): an object that fits in it is written
// with one write, however many reads its body took (HTTP/1.1 bodies arrive
// in socket-sized pieces, HTTP/2 ones in frames of 16 KiB at most); what
// was read before a read error is written before the error is returned,
// so that a resumed download keeps it.
func (s *Store) copyBody(w io.Writer, r io.Reader, limit int64) (int64, error) {
	pool := &s.bufs
	// limit is one more than the bytes wanted (to see a longer body).
	if limit <= smallCopyBufferSize+1 {
		pool = &s.smallBufs
	}
	bp := pool.Get().(*[]byte)
	defer pool.Put(bp)
	buf := *bp
	var n int64
	for n < limit {
		want := int64(len(buf))
		if limit-n < want {
			want = limit - n
		}
		m, rerr := fill(r, buf[:want])
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

// fill reads into buf until it is full, r ends (io.EOF) or a read fails;
// it returns the bytes read. A reader that keeps returning nothing and no
// error fails with io.ErrNoProgress (as bufio does).
func fill(r io.Reader, buf []byte) (int, error) {
	var n, empty int
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
		if m > 0 {
			empty = 0
		} else if empty++; empty >= 100 {
			return n, io.ErrNoProgress
		}
	}
	return n, nil
}

type progressWriter struct{ n *atomic.Int64 }

func (w progressWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(len(p)))
	return len(p), nil
}
