package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// RunSource is implemented by sources that serve many objects per request
// (an OCI artifact's pack layers, an HTTP repository's packs, read with
// single-range GETs over coalesced runs). EnsureObjects hands it every
// object the store lacks at once; the source groups them into runs, and
// the store reads each run's body in order, verifying every object as it
// goes. Objects the source has in no pack (rest) are downloaded each with
// its own request (OpenObject), at the same time as the runs.
type RunSource interface {
	// PlanRuns groups objs (objects the stored image needs) into runs and
	// the rest; every object must be in exactly one run or in rest.
	PlanRuns(ctx context.Context, image cfs.Digest, objs []cfs.Object) (runs []*Run, rest []cfs.Object, err error)
	// OpenRun starts the request for run's objects from the one at index
	// from on (a retry resumes where the previous attempt stopped). The
	// body holds, for each object in order, Skip bytes to discard and then
	// the object's bytes.
	OpenRun(ctx context.Context, run *Run, from int) (io.ReadCloser, error)
}

// Run is one request of a RunSource.
type Run struct {
	Objects []RunObject
	// Where names the request in errors and logs (a blob and a range).
	Where string
	// Data is the source's own.
	Data any
}

// RunObject is an object of a run and the bytes before it in the body.
type RunObject struct {
	cfs.Object
	Skip int64
}

// fetchRuns downloads the missing objects with the run source's requests,
// at most Parallelism runs at a time (and at most the source's
// MaxConcurrentRuns, when it has one; each holding a node-wide download
// slot), and publishes each object as soon as it is verified. An object
// that arrives meanwhile (another call) is read past, and proved with a
// principal. Stats count object bytes as fetched and the bytes read past
// (tar headers, gaps) as RunOverheadBytes. The objects in no run are
// downloaded meanwhile by fetchEach (scan is its argument), so that the
// link is busy with both until each is done; both take the store's
// download slots.
func (s *Store) fetchRuns(ctx context.Context, src Source, rs RunSource, image cfs.Digest, missing []cfs.Object, scan *sinceScan, p *Progress, pid *principalID, st *Stats) ([]cfs.Object, map[string]bool, error) {
	runs, rest, err := rs.PlanRuns(ctx, image, missing)
	if err != nil {
		return nil, nil, err
	}
	planned := make(map[cfs.Digest]int, len(missing))
	for _, r := range runs {
		for _, o := range r.Objects {
			planned[o.Digest]++
		}
	}
	for _, o := range rest {
		planned[o.Digest]++
	}
	for _, o := range missing {
		if planned[o.Digest] != 1 {
			return nil, nil, fmt.Errorf("object %s is in %d runs of %s, want 1", o.Digest, planned[o.Digest], src)
		}
	}
	if len(runs) == 0 {
		return s.fetchEach(ctx, src, rest, scan, p, pid, st)
	}
	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		mu       sync.Mutex
		firstErr error
		dirs     = make(map[string]bool)
		recheck  []cfs.Object
		wg, fwg  sync.WaitGroup
		next     atomic.Int64
	)
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
			cancel(err)
		}
		mu.Unlock()
	}
	// Finishing (durability, naming) runs beside the readers, at most
	// waitersPerSlot per download slot, as in fetchEach.
	finishers := make(chan struct{}, waitersPerSlot*s.opts.Parallelism)
	got := func(o cfs.Object, f *tempFile) {
		if f == nil { // present meanwhile
			mu.Lock()
			if pid != nil && !s.isShown(shownKey{d: o.Digest, p: *pid}) {
				recheck = append(recheck, o)
				mu.Unlock()
				return
			}
			st.Present++
			st.PresentBytes += o.Size
			mu.Unlock()
			p.DoneObjects.Add(1)
			p.DoneBytes.Add(int64(o.Size))
			return
		}
		finishers <- struct{}{}
		fwg.Add(1)
		go func() {
			defer fwg.Done()
			defer func() { <-finishers }()
			if pid != nil { // before the name: see fetchObject
				s.noteShown(shownKey{d: o.Digest, p: *pid})
			}
			dir, err := s.publishObject(wctx, f, o)
			if err != nil {
				fail(err)
				return
			}
			if pid != nil {
				s.markShown(ctx, shownKey{d: o.Digest, p: *pid})
			}
			scan.own.Add(1)
			mu.Lock()
			dirs[dir] = true
			st.Fetched++
			st.FetchedBytes += o.Size
			mu.Unlock()
			p.DoneObjects.Add(1)
			p.DoneBytes.Add(int64(o.Size))
		}()
	}
	var (
		eachDone    = make(chan struct{})
		eachRecheck []cfs.Object
		eachDirs    map[string]bool
		eachStats   Stats
	)
	if len(rest) == 0 {
		close(eachDone)
	} else {
		go func() {
			defer close(eachDone)
			var err error
			eachRecheck, eachDirs, err = s.fetchEach(wctx, src, rest, scan, p, pid, &eachStats)
			if err != nil {
				fail(err)
			}
		}()
	}
	readers := min(s.opts.Parallelism, len(runs))
	if c, ok := rs.(interface{ MaxConcurrentRuns() int }); ok && c.MaxConcurrentRuns() > 0 {
		readers = min(readers, c.MaxConcurrentRuns())
	}
	for range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(runs) || wctx.Err() != nil {
					return
				}
				overhead, err := s.fetchRun(wctx, src, rs, runs[i], p, scan, got)
				mu.Lock()
				st.RunOverheadBytes += uint64(overhead)
				mu.Unlock()
				if err != nil {
					fail(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	fwg.Wait()
	<-eachDone
	st.add(eachStats)
	recheck = append(recheck, eachRecheck...)
	for d := range eachDirs {
		dirs[d] = true
	}
	return recheck, dirs, firstErr
}

// add adds what another part of the same call did (not Objects, Bytes).
func (st *Stats) add(o Stats) {
	st.Present += o.Present
	st.PresentBytes += o.PresentBytes
	st.Extra += o.Extra
	st.ExtraBytes += o.ExtraBytes
	st.Fetched += o.Fetched
	st.FetchedBytes += o.FetchedBytes
	st.Shared += o.Shared
	st.SharedBytes += o.SharedBytes
	st.Proven += o.Proven
	st.ProvenBytes += o.ProvenBytes
	st.ProofBytes += o.ProofBytes
	st.RunOverheadBytes += o.RunOverheadBytes
}

// fetchRun reads one run, retrying transient failures from the first
// object not yet received. It returns the bytes read past. An object is
// looked up again before it is received (a concurrent call may have
// stored it meanwhile: then it is read past) only when another call has
// named an object since the scan.
func (s *Store) fetchRun(ctx context.Context, src Source, rs RunSource, run *Run, p *Progress, scan *sinceScan, got func(cfs.Object, *tempFile)) (int64, error) {
	done := 0
	var overhead int64
	err := s.fetchRunAttempts(ctx, rs, run, func(ctx context.Context) error {
		select {
		case s.downloads <- struct{}{}:
			defer func() { <-s.downloads }()
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		actx, meter, stop := s.stallContext(ctx)
		defer stop()
		body, err := rs.OpenRun(actx, run, done)
		if err != nil {
			return s.stallError(ctx, actx, err)
		}
		defer body.Close()
		r := meterReader{body, meter}
		for done < len(run.Objects) {
			o := run.Objects[done]
			if o.Skip > 0 {
				n, err := io.CopyN(io.Discard, r, o.Skip)
				overhead += n
				if err != nil {
					return s.stallError(ctx, actx, readError(run.Where, err))
				}
			}
			where := missingObject
			if scan.others(s) {
				if where, err = s.locate(ctx, o.Object); err != nil {
					return err
				}
			}
			if where != missingObject {
				n, err := io.CopyN(io.Discard, r, int64(o.Size))
				overhead += n
				if err != nil {
					return s.stallError(ctx, actx, readError(run.Where, err))
				}
				got(o.Object, nil)
				done++
				continue
			}
			// Room in tmp/ for it (the request stays open meanwhile).
			room, err := s.admitObjectDownload(ctx, o.Object)
			if err != nil {
				return err
			}
			f, err := s.receiveObject(func() string { return fmt.Sprintf("%s (object %s)", run.Where, o.Digest) }, o.Object, io.LimitReader(r, int64(o.Size)), p, room)
			if err != nil {
				room.release()
				return s.stallError(ctx, actx, err)
			}
			got(o.Object, f)
			done++
		}
		return nil
	})
	if err != nil {
		return overhead, fmt.Errorf("objects of %s: %w", run.Where, err)
	}
	return overhead, nil
}

// fetchRunAttempts runs attempt with the store's retries; when it fails
// because an object's bytes were wrong and the source can read the run
// from elsewhere (RunFallback), it runs the retries once more.
func (s *Store) fetchRunAttempts(ctx context.Context, rs RunSource, run *Run, attempt func(context.Context) error) error {
	err := s.retry(ctx, "objects "+run.Where, attempt)
	if fb, ok := rs.(RunFallback); ok && err != nil && (errors.Is(err, ErrDigestMismatch) || errors.Is(err, ErrSizeMismatch)) &&
		ctx.Err() == nil && fb.FallBack(ctx, run, err) {
		err = s.retry(ctx, "objects "+run.Where, attempt)
	}
	return err
}

// readError makes a failed read of a run transient (resets, truncation).
func readError(where string, err error) error {
	if errors.Is(err, io.EOF) {
		return Transient(fmt.Errorf("%s: short read", where))
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return Transient(err)
}

// RunFallback is implemented by run sources that may read a run from a
// mirror (any copy whose bytes the store checks). When an object of a run
// fails its check (its digest or size), the store calls FallBack: true
// means the source reads that run from its origin from now on, and the
// store tries the run again from that object, once, instead of failing.
type RunFallback interface {
	FallBack(ctx context.Context, run *Run, why error) bool
}
