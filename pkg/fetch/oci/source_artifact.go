package oci

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/pack"
)

// maxConcurrentRuns bounds the runs read at once (MaxConcurrentRuns).
const maxConcurrentRuns = 16

// MaxConcurrentRuns is how many runs the store reads at once. A run is a
// stream of up to maxRunBytes: a few of them fill a link, and more only
// add what each buffers (a reader, a hasher, its HTTP/2 stream's window)
// while the store, not the link, sets the pace.
func (s *ArtifactSource) MaxConcurrentRuns() int { return maxConcurrentRuns }

// ArtifactSource reads one composefs artifact reference (oci://…): the
// image from its EROFS layer, objects by range from its packs. It
// implements fetch.Source, fetch.RangeSource (proofs of possession read a
// block of the pack that holds the object) and fetch.RunSource.
type ArtifactSource struct {
	c   *Client
	ref Reference

	noRange atomic.Bool // a server ignored Range: read whole packs

	mu       sync.Mutex
	resolved map[cfs.Digest]*resolvedArtifact
	last     *resolvedArtifact
}

type resolvedArtifact struct {
	a *Artifact

	once sync.Once
	idx  *pack.Index
	err  error
}

var (
	_ fetch.Source      = (*ArtifactSource)(nil)
	_ fetch.RangeSource = (*ArtifactSource)(nil)
	_ fetch.RunSource   = (*ArtifactSource)(nil)
)

// NewArtifactSource makes the source of ref (oci://…) through c (a client
// of ref's repository).
func NewArtifactSource(c *Client, ref Reference) *ArtifactSource {
	return &ArtifactSource{c: c, ref: ref, resolved: make(map[cfs.Digest]*resolvedArtifact)}
}

// String names the reference.
func (s *ArtifactSource) String() string { return s.ref.String() }

// CloseIdleConnections closes the client's idle connections.
func (s *ArtifactSource) CloseIdleConnections() { s.c.CloseIdleConnections() }

// resolve asks the registry what the reference names now.
func (s *ArtifactSource) resolve(ctx context.Context) (*resolvedArtifact, error) {
	a, err := s.c.ResolveArtifact(ctx, s.ref.Name())
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if r, ok := s.resolved[a.Digest]; ok && r.a.Manifest.Digest == a.Manifest.Digest {
		s.last = r
		return r, nil
	}
	if len(s.resolved) >= 64 {
		clear(s.resolved)
	}
	r := &resolvedArtifact{a: a}
	s.resolved[a.Digest], s.last = r, r
	return r, nil
}

// forImage returns the artifact of image: the one resolved before, or what
// the reference names now, which must be that image.
func (s *ArtifactSource) forImage(ctx context.Context, image cfs.Digest) (*resolvedArtifact, error) {
	s.mu.Lock()
	r, ok := s.resolved[image]
	s.mu.Unlock()
	if !ok {
		var err error
		if r, err = s.resolve(ctx); err != nil {
			return nil, err
		}
		if r.a.Digest != image {
			return nil, &fetch.SourceError{Op: "resolving", URL: s.String(), Err: fmt.Errorf(
				"it now names composefs image %s, not %s (pin the digest of the image you want): %w", r.a.Digest, image, fetch.ErrNotFound)}
		}
	}
	return r, s.loadIndex(ctx, r)
}

// current returns the artifact resolved last, resolving it if none was.
func (s *ArtifactSource) current(ctx context.Context) (*resolvedArtifact, error) {
	s.mu.Lock()
	r := s.last
	s.mu.Unlock()
	if r == nil {
		var err error
		if r, err = s.resolve(ctx); err != nil {
			return nil, err
		}
	}
	return r, s.loadIndex(ctx, r)
}

func (s *ArtifactSource) loadIndex(ctx context.Context, r *resolvedArtifact) error {
	r.once.Do(func() {
		b, err := s.c.readBlob(ctx, r.a.Index, pack.MaxIndexBytes)
		if err != nil {
			r.err = err
			return
		}
		x, err := pack.DecodeIndex(b)
		if err == nil {
			sizes := make([]int64, len(r.a.Packs))
			for i, p := range r.a.Packs {
				sizes[i] = p.Size
			}
			err = pack.CheckIndex(x, sizes)
		}
		if err != nil {
			r.err = &fetch.SourceError{Op: "reading object index", URL: s.String(), Err: fmt.Errorf("%w: %w", fetch.ErrInvalidImage, err)}
			return
		}
		r.idx = x
	})
	if r.err != nil && fetch.IsTransient(r.err) {
		// Let a retry fetch it again.
		err := r.err
		s.mu.Lock()
		if s.resolved[r.a.Digest] == r {
			delete(s.resolved, r.a.Digest)
		}
		if s.last == r {
			s.last = nil
		}
		s.mu.Unlock()
		return err
	}
	return r.err
}

// OpenImage resolves the reference and opens the EROFS image layer. The
// body fails at its end unless the bytes have the layer's sha256 digest and
// the fs-verity digest the annotation announces.
func (s *ArtifactSource) OpenImage(ctx context.Context, ref fetch.ImageRef) (io.ReadCloser, int64, error) {
	r, err := s.resolve(ctx)
	if err != nil {
		return nil, 0, err
	}
	a := r.a
	if !ref.Digest.IsZero() && ref.Digest != a.Digest {
		return nil, 0, &fetch.SourceError{Op: "resolving", URL: s.String(),
			Err: fmt.Errorf("it names composefs image %s, want %s: %w", a.Digest, ref.Digest, fetch.ErrDigestMismatch)}
	}
	body, _, err := s.c.openBlob(ctx, a.Image, 0, -1)
	if err != nil {
		return nil, 0, err
	}
	what := s.String() + " image layer " + a.Image.Digest.String()
	return &verityCheck{r: s.c.verifying(ctx, body, a.Image, what), want: a.Digest, h: cfs.NewVerityHash(), what: what}, a.Image.Size, nil
}

// verityCheck fails at EOF unless the bytes have the fs-verity digest want.
type verityCheck struct {
	r    io.ReadCloser
	want cfs.Digest
	h    *cfs.VerityHash
	what string
}

func (v *verityCheck) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.h.Write(p[:n])
	if err == io.EOF {
		if got := v.h.Digest(); got != v.want {
			return n, &fetch.SourceError{Op: "reading image", URL: v.what,
				Err: fmt.Errorf("fs-verity digest %s, the annotation says %s: %w", got, v.want, fetch.ErrDigestMismatch)}
		}
	}
	return n, err
}

func (v *verityCheck) Close() error { return v.r.Close() }

// ObjectLocation names the pack and range that hold d, when known.
func (s *ArtifactSource) ObjectLocation(d cfs.Digest) string {
	s.mu.Lock()
	r := s.last
	s.mu.Unlock()
	if r != nil && r.idx != nil {
		if e, ok := r.idx.Lookup(d); ok {
			return fmt.Sprintf("%s pack %s bytes %d+%d", s.String(), r.a.Packs[e.Pack].Digest, e.Offset, e.Size)
		}
	}
	return s.String()
}

// entry finds object d of the given size in the current artifact's index.
func (s *ArtifactSource) entry(ctx context.Context, d cfs.Digest, size uint64) (*resolvedArtifact, pack.Entry, error) {
	r, err := s.current(ctx)
	if err != nil {
		return nil, pack.Entry{}, err
	}
	e, ok := r.idx.Lookup(d)
	if !ok {
		return nil, pack.Entry{}, &fetch.SourceError{Op: "fetching object", URL: s.String(), Err: fmt.Errorf("object %s is not in the artifact's index: %w", d, fetch.ErrNotFound)}
	}
	if e.Size != size {
		return nil, pack.Entry{}, &fetch.SourceError{Op: "fetching object", URL: s.String(),
			Err: fmt.Errorf("object %s has %d bytes in the index, the image records %d: %w", d, e.Size, size, fetch.ErrSizeMismatch)}
	}
	return r, e, nil
}

// OpenObject reads object d from its pack with one range request.
func (s *ArtifactSource) OpenObject(ctx context.Context, d cfs.Digest, size uint64) (io.ReadCloser, error) {
	r, e, err := s.entry(ctx, d, size)
	if err != nil {
		return nil, err
	}
	body, ignored, err := s.c.openBlob(ctx, r.a.Packs[e.Pack], e.Offset, int64(e.Size))
	if ignored {
		s.noRange.Store(true)
	}
	return body, err
}

// OpenObjectRange reads n bytes at off of object d from its pack with one
// range request (a server that ignores Range is read up to them), from
// the registry itself, never a mirror. The body is always exactly the
// range.
func (s *ArtifactSource) OpenObjectRange(ctx context.Context, d cfs.Digest, size uint64, off, n int64) (io.ReadCloser, bool, error) {
	if off < 0 || n <= 0 || uint64(off)+uint64(n) > size {
		return nil, false, fmt.Errorf("range %d+%d of an object of %d bytes", off, n, size)
	}
	r, e, err := s.entry(ctx, d, size)
	if err != nil {
		return nil, false, err
	}
	// From the registry itself: this is what proofs of possession read.
	body, ignored, err := s.c.openUpstreamBlob(ctx, r.a.Packs[e.Pack], e.Offset+off, n)
	if ignored {
		s.noRange.Store(true)
	}
	return body, false, err
}

// PlanRuns groups the missing objects into runs of their packs
// (pack.Plan): a server that ignored Range before gets one request per
// pack.
func (s *ArtifactSource) PlanRuns(ctx context.Context, image cfs.Digest, objs []cfs.Object) ([]*fetch.Run, []cfs.Object, error) {
	r, err := s.forImage(ctx, image)
	if err != nil {
		return nil, nil, err
	}
	ents := make([]pack.Entry, 0, len(objs))
	for _, o := range objs {
		e, ok := r.idx.Lookup(o.Digest)
		if !ok {
			return nil, nil, &fetch.SourceError{Op: "planning", URL: s.String(),
				Err: fmt.Errorf("object %s of the image is not in the artifact's index: %w: %w", o.Digest, fetch.ErrInvalidImage, fetch.ErrNotFound)}
		}
		if e.Size != o.Size {
			return nil, nil, &fetch.SourceError{Op: "planning", URL: s.String(),
				Err: fmt.Errorf("object %s has %d bytes in the index, the image records %d: %w", o.Digest, e.Size, o.Size, fetch.ErrInvalidImage)}
		}
		ents = append(ents, e)
	}
	planned := pack.Plan(ents, func(p int) int64 { return r.a.Packs[p].Size }, s.noRange.Load())
	runs := make([]*fetch.Run, len(planned))
	for i := range planned {
		pr := &planned[i]
		run := &fetch.Run{
			Where: fmt.Sprintf("%s pack %s bytes %d-%d", s.String(), r.a.Packs[pr.Pack].Digest, pr.Starts[0], pr.End-1),
			Data:  &boundRun{Run: pr, art: r},
		}
		for j, e := range pr.Entries {
			run.Objects = append(run.Objects, fetch.RunObject{Object: cfs.Object{Digest: e.Digest, Size: e.Size}, Skip: pr.Skips[j]})
		}
		runs[i] = run
	}
	return runs, nil, nil
}

type boundRun struct {
	*pack.Run
	art    *resolvedArtifact
	mirror atomic.Pointer[string] // the mirror the last OpenRun's body came from, or nil
}

// OpenRun requests the run's bytes from object from on.
func (s *ArtifactSource) OpenRun(ctx context.Context, run *fetch.Run, from int) (io.ReadCloser, error) {
	br, ok := run.Data.(*boundRun)
	if !ok || from < 0 || from >= len(run.Objects) {
		return nil, errors.New("internal error: not a run of this source")
	}
	desc := br.art.a.Packs[br.Pack]
	start := br.Starts[from]
	n := br.End - start
	if start == 0 && s.noRange.Load() {
		body, _, err := s.c.openStream(ctx, desc, 0, -1)
		if err != nil {
			return nil, err
		}
		br.setMirror(mirrorOf(body))
		return body, nil
	}
	body, ignored, err := s.c.openStream(ctx, desc, start, n)
	if ignored {
		s.noRange.Store(true)
	}
	if err == nil {
		br.setMirror(mirrorOf(body))
	}
	return body, err
}

var _ fetch.RunFallback = (*ArtifactSource)(nil)

// FallBack is called when an object of run failed its check: when the
// run was read from a mirror, its pack is read from the registry from now
// on, and FallBack says so (the store then retries the run).
func (s *ArtifactSource) FallBack(ctx context.Context, run *fetch.Run, why error) bool {
	br, ok := run.Data.(*boundRun)
	if !ok {
		return false
	}
	m := br.mirror.Load()
	if m == nil {
		return false
	}
	s.c.distrust(ctx, br.art.a.Packs[br.Pack].Digest, *m, why)
	br.mirror.Store(nil)
	return true
}

func (br *boundRun) setMirror(m string) {
	if m == "" {
		br.mirror.Store(nil)
		return
	}
	br.mirror.Store(&m)
}
