package fetch

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// ImageBuilder is implemented by sources whose images are built on the node
// from what they serve (a container image's layers, converted) rather than
// downloaded. EnsureImage resolves the reference with the caller's
// credentials, and builds the image unless a build of the same key is in
// the store; its objects are written as the build goes, so EnsureObjects
// finds them present.
type ImageBuilder interface {
	Source
	// ResolveBuild asks the source what ref names now.
	ResolveBuild(ctx context.Context, ref ImageRef) (BuildPlan, error)
}

// BuildPlan is one resolved build.
type BuildPlan interface {
	// Key determines the built image: two plans of one key build the same
	// image (for a container image: its config digest and the conversion's
	// format version).
	Key() string
	// Expect is the image digest the source announces (zero when none):
	// a build with another digest fails.
	Expect() cfs.Digest
	// Build makes the tree, writing each regular file's content through
	// sink. It returns the tree and what Prove needs later (kept with the
	// build record).
	Build(ctx context.Context, sink BuildSink) (*cfs.Node, []byte, error)
	// Prove shows that the source holds what a build recorded (proof),
	// with the plan's credentials; it fails with an error that is not
	// transient when it does not.
	Prove(ctx context.Context, proof []byte, sink BuildSink) error
}

// BuildSink is what a build writes through.
type BuildSink interface {
	// Object stores size bytes read from r as an object (unless the store
	// has it) and returns its fs-verity digest. Objects become visible
	// only when the build succeeds.
	Object(ctx context.Context, r io.Reader, size int64) (cfs.Digest, error)
	// Challenge picks the offset of the proofBlock-byte block of a blob
	// (named by name, size bytes) that a proof will ask for: fixed per
	// node and blob, not guessable from outside the node.
	Challenge(name string, size int64) int64
	// Logger for warnings (an image without /usr, …).
	Logger() klog.Logger
	// WillFetch tells the progress (WithProgress) how many bytes the build
	// downloads, and Received counts them as they come.
	WillFetch(total int64)
	Received(n int64)
}

// ProofBlock is the size of the block a build proof asks for.
const ProofBlock = proofBlock

// builtDir keeps one record per build key: the image it built and the
// source's proof data.
const builtDir = "built"

type buildRecord struct {
	Key   string `json:"key"`
	Image string `json:"image"`
	Proof []byte `json:"proof"`
}

func (s *Store) recordPath(key string) string {
	h := sha256.Sum256([]byte(key))
	return filepath.Join(s.root, builtDir, hex.EncodeToString(h[:])+".json")
}

func (s *Store) loadRecord(key string) (*buildRecord, cfs.Digest, bool) {
	b, err := os.ReadFile(s.recordPath(key))
	if err != nil {
		return nil, cfs.Digest{}, false
	}
	var r buildRecord
	if json.Unmarshal(b, &r) != nil || r.Key != key {
		return nil, cfs.Digest{}, false
	}
	d, err := cfs.ParseDigest(r.Image)
	if err != nil {
		return nil, cfs.Digest{}, false
	}
	return &r, d, true
}

func (s *Store) saveRecord(r buildRecord) error {
	if err := os.MkdirAll(filepath.Join(s.root, builtDir), 0o755); err != nil {
		return err
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	path := s.recordPath(r.Key)
	tmp, err := os.CreateTemp(filepath.Dir(path), ".record-*")
	if err != nil {
		return err
	}
	_, err = tmp.Write(b)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

// ensureBuilt is EnsureImage for an ImageBuilder.
func (s *Store) ensureBuilt(ctx context.Context, b ImageBuilder, ref ImageRef, pid *principalID, p *Progress) (cfs.Digest, error) {
	// A pinned image the store has (complete, and shown to the principal)
	// needs no request, as for downloaded images.
	if d := ref.Digest; !d.IsZero() && s.HasImage(d) {
		release := s.hold(d)
		ok := s.builtComplete(ctx, d) && (pid == nil || s.isShown(shownKey{d: d, image: true, p: *pid}))
		release()
		if ok {
			s.touch(d)
			return d, nil
		}
	}
	var plan BuildPlan
	err := s.retry(ctx, "resolving "+ref.String(), func(ctx context.Context) error {
		var err error
		plan, err = b.ResolveBuild(ctx, ref)
		return err
	})
	if err != nil {
		return cfs.Digest{}, err
	}
	if rec, d, ok := s.loadRecord(plan.Key()); ok && s.HasImage(d) {
		release := s.hold(d)
		defer release()
		if s.builtComplete(ctx, d) {
			if err := checkExpected(d, ref.Digest, plan.Expect()); err != nil {
				return cfs.Digest{}, err
			}
			if pid != nil && !s.isShown(shownKey{d: d, image: true, p: *pid}) {
				sink := &buildSink{s: s, ctx: ctx}
				err := s.retry(ctx, "proof of "+ref.String(), func(ctx context.Context) error {
					return plan.Prove(ctx, rec.Proof, sink)
				})
				if err != nil {
					err = notProven("image "+d.String(), b, err)
					if errors.Is(err, ErrNotProven) {
						s.proofs.proofsFailed.Add(1)
					}
					return cfs.Digest{}, err
				}
				s.proofs.proofs.Add(1)
				s.markShown(ctx, shownKey{d: d, image: true, p: *pid})
			}
			s.touch(d)
			return d, nil
		}
	}
	// Builds of one key are shared (by callers of the same source and
	// principal, as downloads are).
	key := fmt.Sprintf("build\x00%s\x00%p\x00%s", b.String(), b, plan.Key())
	if pid != nil {
		key += fmt.Sprintf("\x00%x", pid[:])
	}
	d, _, err := s.images.do(ctx, key, func(ctx context.Context) (cfs.Digest, error) {
		return s.build(ctx, plan, ref, pid, p)
	})
	return d, err
}

// builtComplete reports whether every object of a stored image is present.
func (s *Store) builtComplete(ctx context.Context, d cfs.Digest) bool {
	objs, err := s.Objects(ctx, d)
	if err != nil {
		return false
	}
	for _, o := range objs {
		if where, err := s.locate(ctx, o); err != nil || where == missingObject {
			return false
		}
	}
	return true
}

func checkExpected(d, pinned, announced cfs.Digest) error {
	if !announced.IsZero() && d != announced {
		return fmt.Errorf("the converted image has digest %s, the image's annotation says %s: %w", d, announced, ErrDigestMismatch)
	}
	if !pinned.IsZero() && d != pinned {
		return fmt.Errorf("the converted image has digest %s, want %s: %w", d, pinned, ErrDigestMismatch)
	}
	return nil
}

// build runs a plan: the objects are staged under tmp/ as the build writes
// them and published only when the image is complete and checked, so a
// failed build leaves nothing but what it removes.
func (s *Store) build(ctx context.Context, plan BuildPlan, ref ImageRef, pid *principalID, p *Progress) (cfs.Digest, error) {
	log := klog.FromContext(ctx)
	sink := &buildSink{s: s, ctx: ctx, staged: make(map[cfs.Digest]string), p: p}
	defer sink.discard()
	var (
		root  *cfs.Node
		proof []byte
	)
	err := s.retry(ctx, "converting "+ref.String(), func(ctx context.Context) error {
		var err error
		sink.restart()
		root, proof, err = plan.Build(ctx, sink)
		return err
	})
	if err != nil {
		return cfs.Digest{}, err
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
	d, err := cfs.WriteImage(f, root, cfs.WriteOptions{MinVersion: 1, MaxVersion: 1})
	if err != nil {
		return cfs.Digest{}, fmt.Errorf("writing the image of %s: %w", ref, err)
	}
	if err := checkExpected(d, ref.Digest, plan.Expect()); err != nil {
		return cfs.Digest{}, err
	}
	fi, err := f.Stat()
	if err != nil {
		return cfs.Digest{}, err
	}
	_, objs, err := parseImage(f, fi.Size(), s.opts.MaxImageInodes)
	if err != nil {
		return cfs.Digest{}, fmt.Errorf("image %s built from %s: %w: %w", d, ref, ErrInvalidImage, err)
	}
	// The project's writer made it in this process: canonical.
	s.markCanonical(d)
	// Publish the objects the image references.
	if err := sink.publish(ctx, objs, pid); err != nil {
		return cfs.Digest{}, err
	}
	release, err := s.storeImageFile(ctx, &f, d, objs, pid)
	defer release()
	if err != nil {
		return cfs.Digest{}, err
	}
	if err := s.saveRecord(buildRecord{Key: plan.Key(), Image: d.String(), Proof: proof}); err != nil {
		log.Error(err, "Keeping the build record failed; the next volume of this image converts it again", "image", ref.String())
	}
	s.c.imagesFetched.Add(1)
	log.V(2).Info("image built", "image", ref.String(), "digest", d.String(), "objects", len(objs), "staged", len(sink.staged))
	return d, nil
}

// buildSink stages a build's objects.
type buildSink struct {
	s   *Store
	ctx context.Context

	mu     sync.Mutex
	staged map[cfs.Digest]string // named files under tmp/

	p *Progress // or nil
}

func (b *buildSink) Logger() klog.Logger { return klog.FromContext(b.ctx) }

func (b *buildSink) WillFetch(total int64) {
	if b.p != nil {
		b.p.FetchBytes.Store(total)
	}
}

func (b *buildSink) Received(n int64) {
	if b.p != nil {
		b.p.Fetched.Add(n)
	}
}

// restart zeroes the progress for a new attempt of the build.
func (b *buildSink) restart() {
	if p := b.p; p != nil {
		for _, v := range []*atomic.Int64{&p.Objects, &p.Bytes, &p.DoneObjects, &p.DoneBytes, &p.Fetched} {
			v.Store(0)
		}
	}
}

// wrote counts an object of the build in the progress.
func (b *buildSink) wrote(size int64) {
	if p := b.p; p != nil {
		p.Objects.Add(1)
		p.Bytes.Add(size)
		p.DoneObjects.Add(1)
		p.DoneBytes.Add(size)
	}
}

func (b *buildSink) Challenge(name string, size int64) int64 {
	blocks := (size + proofBlock - 1) / proofBlock
	if blocks <= 1 {
		return 0
	}
	m := hmac.New(sha256.New, b.s.provenanceKey(b.ctx))
	m.Write([]byte("build challenge\x00"))
	m.Write([]byte(name))
	return int64(binary.BigEndian.Uint64(m.Sum(nil))%uint64(blocks)) * proofBlock
}

// smallObject is the size up to which content is hashed in memory first,
// so that an object the store has is not written at all.
const smallObject = 1 << 20

func (b *buildSink) Object(ctx context.Context, r io.Reader, size int64) (cfs.Digest, error) {
	d, err := b.object(r, size)
	if err == nil {
		b.wrote(size)
	}
	return d, err
}

func (b *buildSink) object(r io.Reader, size int64) (cfs.Digest, error) {
	s := b.s
	if size <= smallObject {
		buf := make([]byte, size)
		if _, err := io.ReadFull(r, buf); err != nil {
			return cfs.Digest{}, fmt.Errorf("reading file content: %w", err)
		}
		h := cfs.NewVerityHash()
		h.Write(buf)
		d := h.Digest()
		if b.has(d, size) {
			return d, nil
		}
		return d, b.stage(d, bytes.NewReader(buf), size, true)
	}
	f, err := os.CreateTemp(filepath.Join(s.root, tmpDir), "build-*")
	if err != nil {
		return cfs.Digest{}, fmt.Errorf("creating temporary file: %w", err)
	}
	h := cfs.NewVerityHash()
	wf := &writebackFile{f: f}
	n, err := s.copyBody(io.MultiWriter(wf, h), r, size+1)
	if err == nil && n != size {
		err = fmt.Errorf("file content: %d bytes, the entry says %d", n, size)
	}
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		return cfs.Digest{}, err
	}
	d := h.Digest()
	wf.startWriteback()
	if err := f.Close(); err != nil {
		os.Remove(f.Name())
		return cfs.Digest{}, err
	}
	if b.has(d, size) {
		os.Remove(f.Name())
		return d, nil
	}
	b.mu.Lock()
	b.staged[d] = f.Name()
	b.mu.Unlock()
	return d, nil
}

// has reports whether the object is stored, in an extra directory, or
// staged already.
func (b *buildSink) has(d cfs.Digest, size int64) bool {
	b.mu.Lock()
	_, ok := b.staged[d]
	b.mu.Unlock()
	if ok {
		return true
	}
	where, err := b.s.locate(b.ctx, cfs.Object{Digest: d, Size: uint64(size)})
	return err == nil && where != missingObject
}

func (b *buildSink) stage(d cfs.Digest, r io.Reader, size int64, small bool) error {
	f, err := os.CreateTemp(filepath.Join(b.s.root, tmpDir), "build-*")
	if err != nil {
		return fmt.Errorf("creating temporary file: %w", err)
	}
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		os.Remove(f.Name())
		return fmt.Errorf("writing to the store: %w", err)
	}
	if err := f.Close(); err != nil {
		os.Remove(f.Name())
		return err
	}
	b.mu.Lock()
	b.staged[d] = f.Name()
	b.mu.Unlock()
	return nil
}

// publish gives the staged objects the image references their names
// (after one group sync), marking them shown for the principal.
func (b *buildSink) publish(ctx context.Context, objs []cfs.Object, pid *principalID) error {
	s := b.s
	var todo []cfs.Object
	for _, o := range objs {
		b.mu.Lock()
		_, ok := b.staged[o.Digest]
		b.mu.Unlock()
		if ok {
			todo = append(todo, o)
		}
	}
	for _, o := range todo {
		path := b.staged[o.Digest]
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		if err := s.prepareFile(f, o.Digest, false); err != nil {
			return err
		}
	}
	if err := s.durable.wait(ctx); err != nil {
		return fmt.Errorf("storing objects: %w", err)
	}
	if pid != nil { // before the names: see fetchObject
		for _, o := range objs {
			s.noteShown(shownKey{d: o.Digest, p: *pid})
		}
	}
	dirs := make(map[string]bool)
	for _, o := range todo {
		final := s.objectPath(o.Digest)
		err := os.Rename(b.staged[o.Digest], final)
		if errors.Is(err, fs.ErrNotExist) {
			if err = os.Mkdir(filepath.Dir(final), 0o755); err == nil || errors.Is(err, fs.ErrExist) {
				err = os.Rename(b.staged[o.Digest], final)
			}
		}
		if err != nil {
			return fmt.Errorf("storing object %s: %w", o.Digest, err)
		}
		b.mu.Lock()
		delete(b.staged, o.Digest)
		b.mu.Unlock()
		dirs[filepath.Dir(final)] = true
		s.named.Add(1)
		s.c.objectsFetched.Add(1)
		s.c.objectBytesFetched.Add(o.Size)
	}
	if pid != nil {
		for _, o := range objs {
			s.markShown(ctx, shownKey{d: o.Digest, p: *pid})
		}
	}
	if len(dirs) > 0 {
		return s.durable.wait(ctx)
	}
	return nil
}

// discard removes what was staged and not published.
func (b *buildSink) discard() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for d, p := range b.staged {
		os.Remove(p)
		delete(b.staged, d)
	}
}
