package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// fetchOps runs at most one fetch per key (the volume's content and pull
// policy). A fetch runs under the driver's context, not the caller's: when
// kubelet's deadline comes first the caller answers Aborted and the fetch
// goes on; kubelet's retry joins it or finds it done. A fetch that failed
// while nobody waited for it is kept for the next caller (for a while), so
// that kubelet learns why it failed instead of starting it over and being
// told "in progress" forever.
type fetchOps struct {
	mu     sync.Mutex
	m      map[string]*fetchOp
	failed map[string]*fetchOp // failures no caller has been told of yet
}

type fetchOp struct {
	key      string
	started  time.Time
	progress fetch.Progress
	done     chan struct{}
	digest   cfs.Digest
	stats    fetch.Stats
	err      error
	waiters  int       // callers waiting for the result (under fetchOps.mu)
	ended    time.Time // when it failed, for failed
}

// keepFailure is how long an unreported failure waits for the next call;
// kubelet retries well within it. maxFailures bounds how many are kept.
const (
	keepFailure = 5 * time.Minute
	maxFailures = 1024
)

func newFetchOps() *fetchOps {
	return &fetchOps{m: make(map[string]*fetchOp), failed: make(map[string]*fetchOp)}
}

// inFlight returns how many fetches run.
func (g *fetchOps) inFlight() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.m)
}

// join returns the fetch running for key, or a recent failure for key no
// caller has been told of, or starts a fetch with start. The caller waits
// for the result or calls leave. The op leaves the map when it is done, so
// a later call starts afresh (and finds the work done).
func (g *fetchOps) join(key string, now time.Time, start func(op *fetchOp)) (*fetchOp, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if op, ok := g.m[key]; ok {
		op.waiters++
		return op, false
	}
	if op, ok := g.failed[key]; ok {
		delete(g.failed, key)
		if now.Sub(op.ended) < keepFailure {
			return op, false
		}
	}
	op := &fetchOp{key: key, started: now, done: make(chan struct{}), waiters: 1}
	g.m[key] = op
	start(op)
	return op, true
}

// leave says a caller stopped waiting for op without its result.
func (g *fetchOps) leave(op *fetchOp) {
	g.mu.Lock()
	op.waiters--
	g.mu.Unlock()
}

func (g *fetchOps) finish(op *fetchOp, now time.Time) {
	g.mu.Lock()
	if g.m[op.key] == op {
		delete(g.m, op.key)
	}
	if op.err != nil && op.waiters <= 0 {
		if len(g.failed) >= maxFailures {
			clear(g.failed)
		}
		op.ended = now
		g.failed[op.key] = op
	}
	g.mu.Unlock()
	close(op.done)
}

// ensure makes sure the image of spec and all its objects are in the
// store and returns its digest. It waits for the fetch until shortly
// before ctx's deadline; if the fetch is still running then, it answers
// Aborted (non-final: kubelet retries) and the fetch goes on.
//
// Callers share a fetch only when they also present the same credentials,
// so a volume never rides on a fetch made with another volume's secrets.
func (d *Driver) ensure(ctx context.Context, spec VolumeSpec, src fetch.Source, credFP string) (cfs.Digest, error) {
	key := spec.Key() + " " + string(spec.PullPolicy) + " " + credFP
	log := klog.FromContext(ctx)
	op, started := d.ops.join(key, d.now(), func(op *fetchOp) {
		// The fetch keeps the caller's logger but not its deadline.
		fctx := klog.NewContext(d.ctx, log)
		ok := d.goBackground(func() {
			op.digest, op.stats, op.err = d.fetch(fctx, spec, src, credFP, &op.progress)
			d.metrics.observeFetch(op.stats, op.err)
			if op.err != nil && fctx.Err() == nil {
				log.Error(op.err, "Fetch failed", "source", fetch.RedactURL(spec.Source.URL), "image", spec.Ref.String())
			}
			d.ops.finish(op, d.now())
		})
		if !ok {
			op.err = status.Error(codes.Unavailable, "the plugin is shutting down")
			go d.ops.finish(op, d.now()) // finish takes the lock join holds
		}
	})
	if !started {
		log.V(2).Info("Joining a fetch in progress", "image", spec.Ref.String(), "since", op.started)
	}
	wctx := ctx
	if dl, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		wctx, cancel = context.WithDeadline(ctx, dl.Add(-d.cfg.WaitMargin))
		defer cancel()
	}
	select {
	case <-op.done:
		return op.digest, op.err
	case <-wctx.Done():
		d.ops.leave(op)
		select {
		case <-op.done: // it ended meanwhile: that is the answer
			return op.digest, op.err
		default:
		}
		p := &op.progress
		return cfs.Digest{}, status.Errorf(codes.Aborted,
			"fetching image %s from %s is still in progress (%d of %d objects, %d of %d bytes downloaded); it goes on in the background",
			spec.Ref, fetch.RedactURL(spec.Source.URL), p.DoneObjects.Load(), p.Objects.Load(), p.Fetched.Load(), p.FetchBytes.Load())
	}
}

// principal names who a volume's requests speak for: its source and its
// credentials. Content on the node serves a volume only once its principal
// has shown it holds it (fetch.ForPrincipal).
func principal(spec VolumeSpec, credFP string) string {
	return string(spec.Source.Kind) + " " + spec.Source.URL + " " + credFP
}

// completeKey marks an image whose objects were all ensured for a
// principal ("" with --trust-shared-content).
type completeKey struct {
	image     cfs.Digest
	principal string
}

// fetch brings the image and its objects into the store.
//
// Content on the node is not proof that a volume may read it: naming a
// digest is not access. Unless TrustSharedContent is set, the image and
// every object serve the volume only after its source, with its
// credentials, has shown that it holds them: by delivering them, or by a
// proof of possession the store makes (the image re-read and hashed; a
// block of each object). What a principal showed is remembered across
// restarts, so the same source and credentials pay nothing again.
func (d *Driver) fetch(ctx context.Context, spec VolumeSpec, src fetch.Source, credFP string, p *fetch.Progress) (cfs.Digest, fetch.Stats, error) {
	ref := spec.Ref
	nameKey := spec.Source.URL + " " + ref.Name
	repo := src
	src, err := fetch.BindRef(repo, ref)
	if err != nil {
		return cfs.Digest{}, fetch.Stats{}, err
	}
	var who string
	opts := []fetch.EnsureOption{fetch.WithProgress(p)}
	if !d.cfg.TrustSharedContent {
		who = principal(spec, credFP)
		opts = append(opts, fetch.ForPrincipal(who))
	}
	cachedName := false
	switch spec.PullPolicy {
	case PullAlways:
		// Ask the source again, by name when there is one; the digest, if
		// given, is checked against what the source serves.
		if ref.Name != "" {
			ref.Digest = cfs.Digest{}
		}
	case PullNever:
		src = neverSource{}
		fallthrough
	default:
		if ref.Digest.IsZero() {
			d.mu.Lock()
			dg, ok := d.names[nameKey]
			d.mu.Unlock()
			// A name another principal resolved is resolved again (the
			// image is small; fetching it is its proof).
			if ok && d.store.HasImage(dg) && (who == "" || spec.PullPolicy == PullNever || d.store.ImageShown(ctx, dg, who)) {
				ref.Digest, cachedName = dg, true
			}
		}
	}
	if spec.PullPolicy == PullNever && (ref.Digest.IsZero() || !d.store.HasImage(ref.Digest)) {
		return cfs.Digest{}, fetch.Stats{}, fmt.Errorf("image %s: %w", spec.Ref, errNotOnNode)
	}
	// A registry's images are signed by manifest digest: the name is
	// resolved and the signature of what it names checked, and the
	// manifest verified is what gets fetched (bound by digest, so a tag
	// moved meanwhile changes nothing). A name this node resolved and
	// verified before (kept by IfNotPresent), or a digest whose image this
	// node holds and verified in this process as signed by a key the rule
	// accepts, is used as it is. (A manifest signature kept in the store
	// counts only for pullPolicy Never: verifiedOnNode.)
	var signer *manifestVerdict
	if ms, ok := repo.(fetch.ManifestSigner); ok && spec.PullPolicy != PullNever {
		known := !ref.Digest.IsZero() && d.store.HasImage(ref.Digest)
		if rule := d.trustRule(spec.Source); rule != nil && !(known && d.verifiedBy("image "+ref.Digest.String(), rule) != nil) {
			manifest, k, err := d.checkManifestSignature(ctx, spec, ms, rule)
			if err != nil {
				return cfs.Digest{}, fetch.Stats{}, err
			}
			if k != nil {
				ref = fetch.ImageRef{Name: manifest, Digest: spec.Ref.Digest}
				cachedName, signer = false, k
				if src, err = fetch.BindRef(repo, ref); err != nil {
					return cfs.Digest{}, fetch.Stats{}, err
				}
			}
		}
	}
	fromStore := !ref.Digest.IsZero() && d.store.HasImage(ref.Digest)
	dg, err := d.store.EnsureImage(ctx, src, ref, opts...)
	if err != nil {
		return cfs.Digest{}, fetch.Stats{}, neverProven(spec, err)
	}
	if !spec.Ref.Digest.IsZero() && dg != spec.Ref.Digest {
		return cfs.Digest{}, fetch.Stats{}, fmt.Errorf("image %s: the source serves digest %s: %w", spec.Ref, dg, fetch.ErrDigestMismatch)
	}
	// The trust policy is applied to the image as stored: what is checked
	// is what gets pinned and mounted.
	err = d.checkImageSignature(ctx, spec, src, ref.Name, dg, signer)
	if err != nil && cachedName && isVerdict(err) {
		// The name may have moved, with a new signature, since this node
		// resolved it: resolve it again, once.
		d.mu.Lock()
		delete(d.names, nameKey)
		d.mu.Unlock()
		ref.Digest, fromStore = cfs.Digest{}, false
		if dg, err = d.store.EnsureImage(ctx, src, ref, opts...); err != nil {
			return cfs.Digest{}, fetch.Stats{}, err
		}
		err = d.checkImageSignature(ctx, spec, src, ref.Name, dg, nil)
	}
	if err != nil {
		return cfs.Digest{}, fetch.Stats{}, err
	}
	if ref.Name != "" {
		d.mu.Lock()
		d.names[nameKey] = dg
		d.mu.Unlock()
	}
	// Skip the per-object check only for an image that stayed in the store
	// since its objects were last ensured (GC clears the mark of images it
	// may have touched, and a fetched image is checked again).
	ck := completeKey{dg, who}
	d.mu.Lock()
	done := fromStore && d.complete[ck]
	d.mu.Unlock()
	if done {
		return dg, fetch.Stats{}, nil
	}
	st, err := d.store.EnsureObjects(ctx, src, dg, opts...)
	if err != nil {
		return dg, st, neverProven(spec, err)
	}
	d.mu.Lock()
	if len(d.complete) >= 100000 { // bound it; entries are cheap to earn again
		clear(d.complete)
	}
	d.complete[ck] = true
	d.mu.Unlock()
	return dg, st, nil
}

// neverProven explains a missing proof under pullPolicy Never, which
// forbids the request a proof needs.
func neverProven(spec VolumeSpec, err error) error {
	if spec.PullPolicy == PullNever && errors.Is(err, fetch.ErrNotProven) {
		return fmt.Errorf("%w: %w", errNotAuthorized, err)
	}
	return err
}

// neverSource serves nothing: with pullPolicy Never, what the node lacks
// is an error.
type neverSource struct{}

func (neverSource) String() string { return "nothing (pullPolicy Never)" }

func (neverSource) OpenImage(context.Context, fetch.ImageRef) (io.ReadCloser, int64, error) {
	return nil, 0, fmt.Errorf("image: %w", errNotOnNode)
}

func (neverSource) OpenObject(_ context.Context, dg cfs.Digest, _ uint64) (io.ReadCloser, error) {
	return nil, fmt.Errorf("object %s: %w", dg, errNotOnNode)
}
