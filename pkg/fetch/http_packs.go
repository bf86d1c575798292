package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/pack"
)

// An HTTP repository may hold packs (README, "HTTP repository"):
// REPO/packs/<sha256 hex>.tar, uncompressed tars of small objects, and per
// image REPO/packs/<image fs-verity hex>.idx, the pack index saying which
// pack holds each of its packed objects and where. The source reads the
// packed objects the store lacks with coalesced single-range GETs of the
// packs (RunSource, the planner the OCI artifact uses), and the rest
// (large objects, objects of no pack) each from objects/. objects/ stays
// complete and authoritative: without a pack index, with one for another
// image or one that does not decode, every object comes from objects/;
// a pack that is missing, of the wrong size or that holds wrong bytes
// gives way to the objects' own URLs.

var _ RunSource = (*HTTPSource)(nil)

// maxConcurrentHTTPRuns bounds the runs read at once, as an OCI
// artifact's (a run is a stream of up to pack.MaxRunBytes: a few fill a
// link).
const maxConcurrentHTTPRuns = 16

// MaxConcurrentRuns is how many runs the store reads at once.
func (s *HTTPSource) MaxConcurrentRuns() int { return maxConcurrentHTTPRuns }

func (s *HTTPSource) packURL(name string) *url.URL {
	u := *s.base
	u.Path = strings.TrimSuffix(u.Path, "/") + "/packs/" + name
	u.RawPath = ""
	return &u
}

// PackIndexName is the file name of image d's pack index in REPO/packs/.
func PackIndexName(d cfs.Digest) string { return d.String() + ".idx" }

// packIndex GETs the pack index of image; nil when the repository has
// none for it (404, an index that does not decode or names another
// image: logged).
func (s *HTTPSource) packIndex(ctx context.Context, image cfs.Digest) (*pack.RepoIndex, error) {
	log := klog.FromContext(ctx)
	u := s.packURL(PackIndexName(image))
	resp, err := s.getURL(ctx, "fetching pack index", u)
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			log.V(3).Info("No pack index: every object from objects/", "repository", s.String(), "image", image.String())
			return nil, nil
		}
		return nil, err
	}
	defer resp.Body.Close()
	if resp.ContentLength > pack.MaxIndexBytes {
		log.Info("Pack index too large; ignoring it", "url", redactedURL(u), "bytes", resp.ContentLength)
		return nil, nil
	}
	b, err := io.ReadAll(io.LimitReader(httpBody{ReadCloser: resp.Body, op: "reading pack index", url: resp.Request.URL}, pack.MaxIndexBytes+1))
	if err != nil {
		return nil, Transient(err)
	}
	x, err := pack.DecodeRepoIndex(b)
	if err != nil {
		log.Info("Pack index does not decode; ignoring it", "url", redactedURL(u), "err", err)
		return nil, nil
	}
	if x.Image != image {
		log.Info("Pack index is for another image; ignoring it", "url", redactedURL(u), "image", image.String(), "indexImage", x.Image.String())
		return nil, nil
	}
	return x, nil
}

// httpRun is the source's data of a run.
type httpRun struct {
	*pack.Run
	ref pack.PackRef
	// objects: read the run's objects from objects/, each with its own
	// request (the pack failed).
	objects atomic.Bool
}

// PlanRuns reads the image's pack index and plans runs of the packs for
// the objects it lists (with the size the image records); the others are
// the rest. Without a usable index, all are the rest. A server that
// ignored Range before gets one request per pack.
func (s *HTTPSource) PlanRuns(ctx context.Context, image cfs.Digest, objs []cfs.Object) ([]*Run, []cfs.Object, error) {
	x, err := s.packIndex(ctx, image)
	if err != nil {
		klog.FromContext(ctx).Info("Pack index unavailable; every object from objects/", "repository", s.String(), "err", err)
		return nil, objs, nil
	}
	if x == nil {
		return nil, objs, nil
	}
	var ents []pack.Entry
	var rest []cfs.Object
	for _, o := range objs {
		if e, ok := x.Index.Lookup(o.Digest); ok && e.Size == o.Size {
			ents = append(ents, e)
		} else {
			rest = append(rest, o)
		}
	}
	planned := pack.Plan(ents, func(p int) int64 { return x.Packs[p].Size }, s.packNoRange.Load())
	runs := make([]*Run, len(planned))
	for i := range planned {
		pr := &planned[i]
		ref := x.Packs[pr.Pack]
		run := &Run{
			Where: fmt.Sprintf("%s bytes %d-%d", redactedURL(s.packURL(ref.Name())), pr.Starts[0], pr.End-1),
			Data:  &httpRun{Run: pr, ref: ref},
		}
		run.Objects = make([]RunObject, len(pr.Entries))
		for j, e := range pr.Entries {
			run.Objects[j] = RunObject{Object: cfs.Object{Digest: e.Digest, Size: e.Size}, Skip: pr.Skips[j]}
		}
		runs[i] = run
	}
	return runs, rest, nil
}

// OpenRun GETs the run's range of its pack from object from on. When the
// pack fails for good (missing, of another size, a wrong Content-Range),
// the run's objects are read from objects/ instead.
func (s *HTTPSource) OpenRun(ctx context.Context, run *Run, from int) (io.ReadCloser, error) {
	hr, ok := run.Data.(*httpRun)
	if !ok || from < 0 || from >= len(run.Objects) {
		return nil, errors.New("internal error: not a run of this source")
	}
	if !hr.objects.Load() {
		body, err := s.openPackRange(ctx, hr.ref, hr.Starts[from], hr.End-hr.Starts[from])
		if err == nil || IsTransient(err) || ctx.Err() != nil {
			return body, err
		}
		klog.FromContext(ctx).Info("Pack failed; reading its objects from objects/", "run", run.Where, "err", err)
		hr.objects.Store(true)
	}
	return newObjectsBody(ctx, s, run.Objects[from:]), nil
}

// FallBack is called when an object of run failed its check: the run's
// objects are read from objects/ from now on.
func (s *HTTPSource) FallBack(ctx context.Context, run *Run, why error) bool {
	hr, ok := run.Data.(*httpRun)
	if !ok || hr.objects.Load() {
		return false
	}
	klog.FromContext(ctx).Info("Pack holds wrong bytes; reading its objects from objects/", "run", run.Where, "err", why)
	hr.objects.Store(true)
	return true
}

// openPackRange GETs n bytes at off of pack ref (the whole pack without a
// Range header). A server that ignores Range is read up to them, and
// later plans read whole packs.
func (s *HTTPSource) openPackRange(ctx context.Context, ref pack.PackRef, off, n int64) (io.ReadCloser, error) {
	u := s.packURL(ref.Name())
	ranged := off != 0 || n != ref.Size
	var hdr []string
	if ranged {
		hdr = []string{"Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1)}
	}
	resp, err := s.getURLOwn(ctx, "fetching pack", u, hdr...)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (io.ReadCloser, error) {
		_, _ = io.CopyN(io.Discard, resp.Body, 4096)
		resp.Body.Close()
		return nil, &SourceError{Op: "fetching pack", URL: resp.Request.URL.String(), Status: resp.StatusCode, Err: err}
	}
	body := httpBody{ReadCloser: resp.Body, op: "reading pack", url: resp.Request.URL}
	if resp.StatusCode == http.StatusPartialContent {
		first, last, total, err := ParseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return fail(err)
		}
		if first != off || last != off+n-1 || (total >= 0 && total != ref.Size) {
			return fail(fmt.Errorf("asked for bytes %d-%d/%d, got Content-Range %q: %w", off, off+n-1, ref.Size, resp.Header.Get("Content-Range"), ErrSizeMismatch))
		}
		return body, nil
	}
	if resp.ContentLength >= 0 && resp.ContentLength != ref.Size {
		return fail(fmt.Errorf("%d bytes announced, the pack index says %d: %w", resp.ContentLength, ref.Size, ErrSizeMismatch))
	}
	if !ranged {
		return body, nil
	}
	s.packNoRange.Store(true)
	if _, err := io.CopyN(io.Discard, body, off); err != nil {
		resp.Body.Close()
		return nil, Transient(err)
	}
	return struct {
		io.Reader
		io.Closer
	}{io.LimitReader(body, n), resp.Body}, nil
}

// objectsBody is the body of a run read from objects/: for each object,
// its Skip bytes (zeros) and then its own GET's body.
type objectsBody struct {
	ctx  context.Context
	s    *HTTPSource
	objs []RunObject
	skip int64 // of objs[0], still to give
	cur  io.ReadCloser
	left int64 // of cur
}

func newObjectsBody(ctx context.Context, s *HTTPSource, objs []RunObject) *objectsBody {
	return &objectsBody{ctx: ctx, s: s, objs: objs, skip: objs[0].Skip}
}

func (b *objectsBody) Read(p []byte) (int, error) {
	for len(b.objs) > 0 {
		if b.skip > 0 {
			n := int(min(int64(len(p)), b.skip))
			clear(p[:n])
			b.skip -= int64(n)
			return n, nil
		}
		o := b.objs[0]
		if b.cur == nil {
			rc, err := b.s.OpenObject(b.ctx, o.Digest, o.Size)
			if err != nil {
				return 0, err
			}
			b.cur, b.left = rc, int64(o.Size)
		}
		if b.left > 0 {
			n, err := b.cur.Read(p[:min(int64(len(p)), b.left)])
			b.left -= int64(n)
			switch {
			case err == io.EOF && b.left > 0:
				err = io.ErrUnexpectedEOF
			case err == io.EOF:
				err = nil
			}
			if n > 0 || err != nil {
				return n, err
			}
			continue
		}
		b.cur.Close()
		b.cur, b.objs = nil, b.objs[1:]
		if len(b.objs) > 0 {
			b.skip = b.objs[0].Skip
		}
	}
	return 0, io.EOF
}

func (b *objectsBody) Close() error {
	if b.cur != nil {
		return b.cur.Close()
	}
	return nil
}
