package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// DefaultStoreDir is the node store the plugin uses unless told otherwise.
const DefaultStoreDir = "/var/lib/csi-composefs"

// Store layout under the root directory.
const (
	objectsDir    = "objects"    // objects/xx/yyyy…, usable as an overlay data-only layer
	imagesDir     = "images"     // images/<digest>.cfs
	tmpDir        = "tmp"        // partial downloads, cleared at Open
	quarantineDir = "quarantine" // corrupt files Verify found
	lockFile      = ".lock"
	imageSuffix   = ".cfs"
)

// Options configure a Store.
type Options struct {
	// ExtraObjectDirs are read-only object stores (same xx/yyyy… layout)
	// whose objects need not be fetched; the driver mounts them as extra
	// data-only layers.
	ExtraObjectDirs []string
	// Parallelism bounds concurrent object downloads per EnsureObjects
	// call; 0 means 16.
	Parallelism int
	// MaxConcurrentDownloads bounds concurrent object downloads across all
	// EnsureObjects calls of the store (node-wide, on top of Parallelism
	// per call); 0 means 64.
	MaxConcurrentDownloads int
	// MaxImageSize bounds an image download; 0 means 128 MiB. Parsing an
	// image takes about ten times its size in memory.
	MaxImageSize int64
	// MaxImageInodes bounds the inodes of an image (cfs.OpenOptions
	// MaxInodes); 0 means the reader's default (4,000,000).
	MaxImageInodes int
	// MaxSize is the store's size budget for GC (bytes allocated under
	// objects/ and images/); 0 means no budget (GC then only removes
	// objects no image references).
	MaxSize int64
	// Retries is how many times a transient failure is retried; 0 means 5,
	// negative means none.
	Retries int
	// RetryBaseDelay is the first backoff (doubling, with full jitter, up to
	// RetryMaxDelay); 0 means 250ms and 10s.
	RetryBaseDelay, RetryMaxDelay time.Duration
	// StallTimeout fails an attempt (transiently) when a response sends no
	// byte for that long, and is the sliding window over which MinRate is
	// measured; 0 means 60s.
	StallTimeout time.Duration
	// MinRate fails an attempt (transiently) whose throughput over the last
	// StallTimeout is under that many bytes per second, so that a server
	// trickling bytes cannot keep a download alive forever (retries stay
	// bounded by Retries); 0 means 16 KiB/s, negative means only the stall
	// check.
	MinRate int64
	// GCGrace keeps images used within that long from GC even when not
	// pinned, covering the gap between EnsureImage and Pin; 0 means 10m.
	GCGrace time.Duration
	// DisableVerity skips enabling fs-verity on stored files even where the
	// filesystem supports it.
	DisableVerity bool
	// MustExist makes Open refuse a directory that is not a store already
	// (CheckStoreDir) instead of creating one there.
	MustExist bool
}

func (o *Options) setDefaults() {
	if o.Parallelism <= 0 {
		o.Parallelism = 16
	}
	if o.MaxConcurrentDownloads <= 0 {
		o.MaxConcurrentDownloads = 64
	}
	if o.MaxImageSize <= 0 {
		o.MaxImageSize = 128 << 20
	}
	if o.Retries == 0 {
		o.Retries = 5
	} else if o.Retries < 0 {
		o.Retries = 0
	}
	if o.RetryBaseDelay <= 0 {
		o.RetryBaseDelay = 250 * time.Millisecond
	}
	if o.RetryMaxDelay <= 0 {
		o.RetryMaxDelay = 10 * time.Second
	}
	if o.StallTimeout <= 0 {
		o.StallTimeout = 60 * time.Second
	}
	if o.MinRate == 0 {
		o.MinRate = 16 << 10
	} else if o.MinRate < 0 {
		o.MinRate = 0
	}
	if o.GCGrace <= 0 {
		o.GCGrace = 10 * time.Minute
	}
}

// Store is the node-wide content-addressed store:
//
//	ROOT/objects/xx/yyyy…   backing files named by fs-verity digest
//	ROOT/images/<hex>.cfs   composefs images named by fs-verity digest
//	ROOT/tmp/               partial downloads (cleared by Open)
//	ROOT/quarantine/        corrupt files found by Verify
//
// Only complete, verified, durable files are renamed (images, and objects
// where O_TMPFILE is not available) or linked (anonymous O_TMPFILE objects)
// into objects/ and images/, so every file there has the digest its name
// says, whatever crashes. One process at a time opens a store (an flock on ROOT/.lock).
// A Store is safe for concurrent use; concurrent requests for the same image
// or object share one download.
//
// Pins are kept in memory: after a restart the driver re-pins the images its
// volumes use (from its own state) before the first GC. Until then GCGrace
// still protects recently used images from a budget GC.
type Store struct {
	root string
	opts Options
	lock *os.File

	verity atomic.Bool // enable fs-verity on stored files

	mu      sync.Mutex
	pins    map[cfs.Digest]int          // Pin/Unpin counts
	busy    map[cfs.Digest]int          // images an Ensure call is working on
	lastUse map[cfs.Digest]time.Time    // in-process last use, for GC grace and LRU
	index   map[cfs.Digest][]cfs.Object // objects of parsed images (immutable)
	gen     uint64                      // bumped when pins or busy gain an image

	bufs sync.Pool // *[]byte copy buffers

	durable *groupSync // makes downloaded objects durable in groups

	downloads chan struct{} // node-wide object download slots

	images  flightGroup[cfs.Digest]
	objects flightGroup[objectResult]

	c counters
}

type objectResult struct {
	fetched uint64 // bytes downloaded
	dir     string // object directory renamed into, to fsync
}

// Open opens (creating it if needed) the store at root, takes its lock and
// removes leftovers of interrupted downloads from tmp/.
func Open(ctx context.Context, root string, opts Options) (*Store, error) {
	opts.setDefaults()
	log := klog.FromContext(ctx)
	if opts.MustExist {
		if err := CheckStoreDir(root); err != nil {
			return nil, err
		}
	}
	for _, d := range []string{"", objectsDir, imagesDir, tmpDir, quarantineDir} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return nil, fmt.Errorf("opening store %s: %w", root, err)
		}
	}
	lf, err := os.OpenFile(filepath.Join(root, lockFile), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening store %s: %w", root, err)
	}
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lf.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("opening store %s: in use by another process", root)
		}
		return nil, fmt.Errorf("opening store %s: locking: %w", root, err)
	}
	s := &Store{
		root:    root,
		opts:    opts,
		lock:    lf,
		pins:    make(map[cfs.Digest]int),
		busy:    make(map[cfs.Digest]int),
		lastUse: make(map[cfs.Digest]time.Time),
		index:   make(map[cfs.Digest][]cfs.Object),

		downloads: make(chan struct{}, opts.MaxConcurrentDownloads),
	}
	s.bufs.New = func() any { b := make([]byte, 256<<10); return &b }
	if s.durable, err = newGroupSync(root); err != nil {
		s.Close()
		return nil, fmt.Errorf("opening store %s: %w", root, err)
	}
	if err := s.clearTmp(); err != nil {
		s.Close()
		return nil, err
	}
	for _, c := range "0123456789abcdef" {
		if err := os.Mkdir(filepath.Join(root, tmpDir, string(c)), 0o755); err != nil {
			s.Close()
			return nil, fmt.Errorf("opening store %s: %w", root, err)
		}
	}
	if !opts.DisableVerity {
		ok, err := cfs.VeritySupport(filepath.Join(root, tmpDir))
		if err != nil {
			log.V(1).Info("fs-verity probe failed; not enabling fs-verity", "store", root, "err", err)
		}
		s.verity.Store(ok)
	}
	log.V(2).Info("store opened", "store", root, "fsVerity", s.verity.Load())
	return s, nil
}

// Close releases the store's lock.
func (s *Store) Close() error {
	if s.lock == nil {
		return nil
	}
	if s.durable != nil {
		s.durable.close()
	}
	err := s.lock.Close()
	s.lock = nil
	return err
}

// Root returns the store's directory.
func (s *Store) Root() string { return s.root }

// ObjectsDir returns the objects directory (an overlay data-only layer).
func (s *Store) ObjectsDir() string { return filepath.Join(s.root, objectsDir) }

// ImagePath returns where the image with digest d is kept.
func (s *Store) ImagePath(d cfs.Digest) string {
	return filepath.Join(s.root, imagesDir, d.String()+imageSuffix)
}

// VerityEnabled reports whether stored files get fs-verity.
func (s *Store) VerityEnabled() bool { return s.verity.Load() }

func (s *Store) objectPath(d cfs.Digest) string {
	return filepath.Join(s.root, objectsDir, d.ObjectPath())
}

func (s *Store) clearTmp() error {
	dir := filepath.Join(s.root, tmpDir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("clearing %s: %w", dir, err)
	}
	for _, e := range ents {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("clearing %s: %w", dir, err)
		}
	}
	return nil
}

// Pin marks an image in use by a mount: GC never removes a pinned image or
// its objects. Pins are counted and kept in memory only.
func (s *Store) Pin(image cfs.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pins[image]++
	s.lastUse[image] = time.Now()
	s.gen++
}

// Unpin releases one Pin.
func (s *Store) Unpin(image cfs.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pins[image] <= 1 {
		delete(s.pins, image)
	} else {
		s.pins[image]--
	}
	s.lastUse[image] = time.Now()
}

// Pinned returns the pinned images and their pin counts.
func (s *Store) Pinned() map[cfs.Digest]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[cfs.Digest]int, len(s.pins))
	for k, v := range s.pins {
		m[k] = v
	}
	return m
}

// hold marks image busy until the returned func is called.
func (s *Store) hold(image cfs.Digest) func() {
	s.mu.Lock()
	s.busy[image]++
	s.lastUse[image] = time.Now()
	s.gen++
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		if s.busy[image] <= 1 {
			delete(s.busy, image)
		} else {
			s.busy[image]--
		}
		s.lastUse[image] = time.Now()
		s.mu.Unlock()
	}
}

// HasImage reports whether the image is in the store.
func (s *Store) HasImage(d cfs.Digest) bool {
	fi, err := os.Stat(s.ImagePath(d))
	return err == nil && fi.Mode().IsRegular()
}

// EnsureImage makes sure the image ref names is in the store and returns its
// digest. With ref.Digest set and the image present, the source is not
// contacted. Otherwise the image is downloaded (at most MaxImageSize bytes)
// while its digest is computed; a digest other than ref.Digest is refused
// and nothing is kept; the image is parsed with the strict reader before it
// is stored. Concurrent calls for the same ref share one download.
func (s *Store) EnsureImage(ctx context.Context, src Source, ref ImageRef) (cfs.Digest, error) {
	if ref.Name == "" && ref.Digest.IsZero() {
		return cfs.Digest{}, errors.New("image reference: a name or a digest is needed")
	}
	if !ref.Digest.IsZero() && s.HasImage(ref.Digest) {
		release := s.hold(ref.Digest)
		defer release()
		if _, err := s.Objects(ctx, ref.Digest); err == nil {
			s.touch(ref.Digest)
			return ref.Digest, nil
		}
		// Unreadable or gone meanwhile: fetch it again.
	}
	// Downloads are shared only by callers holding the same Source value:
	// a caller never rides on a download made with someone else's
	// credentials (the driver keeps one Source per URL and credentials).
	key := fmt.Sprintf("%s\x00%p\x00%s", src.String(), src, ref.String())
	d, _, err := s.images.do(ctx, key, func(ctx context.Context) (cfs.Digest, error) {
		return s.fetchImage(ctx, src, ref)
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

func (s *Store) fetchImage(ctx context.Context, src Source, ref ImageRef) (cfs.Digest, error) {
	log := klog.FromContext(ctx)
	var d cfs.Digest
	err := s.retry(ctx, "image "+ref.String(), func(ctx context.Context) error {
		var err error
		d, err = s.fetchImageOnce(ctx, src, ref)
		return err
	})
	if err == nil {
		log.V(2).Info("image stored", "image", ref.String(), "digest", d.String(), "source", src.String())
	}
	return d, err
}

func (s *Store) fetchImageOnce(ctx context.Context, src Source, ref ImageRef) (cfs.Digest, error) {
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
	objs, err := parseImage(f, n, s.opts.MaxImageInodes)
	if err != nil {
		return cfs.Digest{}, fmt.Errorf("image %s: %w: %w", d, ErrInvalidImage, err)
	}
	if err := s.finishFile(f); err != nil {
		return cfs.Digest{}, err
	}
	release := s.hold(d)
	defer release()
	s.mu.Lock()
	s.index[d] = objs
	s.mu.Unlock()
	final := s.ImagePath(d)
	if err := os.Rename(f.Name(), final); err != nil {
		return cfs.Digest{}, fmt.Errorf("storing image %s: %w", d, err)
	}
	f = nil
	if err := syncDir(filepath.Dir(final)); err != nil {
		return cfs.Digest{}, err
	}
	s.c.imagesFetched.Add(1)
	s.c.imageBytesFetched.Add(uint64(n))
	return d, nil
}

// finishFile makes a complete, verified temporary file ready to be renamed
// into the store: mode 0644, fsynced, closed, fs-verity enabled where the
// filesystem supports it. f is closed.
func (s *Store) finishFile(f *os.File) error { return s.prepareFile(f, true) }

// prepareFile makes a complete, verified temporary file ready to be
// renamed into the store: mode 0644, fsynced when sync is set (otherwise
// the caller makes it durable), closed, fs-verity enabled where the
// filesystem supports it. f is closed.
func (s *Store) prepareFile(f *os.File, sync bool) error {
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("finishing %s: %w", f.Name(), err)
	}
	if sync {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("syncing %s: %w", f.Name(), err)
		}
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", f.Name(), err)
	}
	if !s.verity.Load() {
		return nil
	}
	ro, err := os.Open(f.Name())
	if err != nil {
		return fmt.Errorf("enabling fs-verity: %w", err)
	}
	defer ro.Close()
	if err := cfs.EnableVerity(ro); err != nil {
		if errors.Is(err, cfs.ErrVerityUnsupported) {
			s.verity.Store(false)
			return nil
		}
		return err
	}
	return nil
}

// prepareTemp makes a complete, verified temporary object file ready to be
// published once the group sync has made it durable: mode 0644, fs-verity
// enabled where the filesystem supports it. It stays open (an anonymous
// file lives only as long as a descriptor on it).
func (s *Store) prepareTemp(t *tempFile) error {
	if !t.anon {
		return s.prepareFile(t.File, false)
	}
	if err := t.Chmod(0o644); err != nil {
		return fmt.Errorf("finishing %s: %w", t.Name(), err)
	}
	if !s.verity.Load() {
		return nil
	}
	if err := t.reopenReadOnly(); err != nil {
		return fmt.Errorf("enabling fs-verity: %w", err)
	}
	if err := cfs.EnableVerity(t.File); err != nil {
		if errors.Is(err, cfs.ErrVerityUnsupported) {
			s.verity.Store(false)
			return nil
		}
		return err
	}
	return nil
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
	s.mu.Lock()
	s.index[image] = objs
	s.mu.Unlock()
	return objs, nil
}

func (s *Store) parseStored(ctx context.Context, image cfs.Digest) ([]cfs.Object, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f, err := os.Open(s.ImagePath(image))
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
	objs, err := parseImage(f, fi.Size(), math.MaxInt)
	if err != nil {
		return nil, fmt.Errorf("image %s in the store: %w: %w", image, ErrInvalidImage, err)
	}
	return objs, nil
}

// parseImage validates an image with the strict reader (at most maxInodes
// inodes, 0 meaning the reader's default) and returns its objects, each
// named by digest.
func parseImage(r io.ReaderAt, size int64, maxInodes int) ([]cfs.Object, error) {
	img, err := cfs.Open(r, size, cfs.OpenOptions{MaxInodes: maxInodes})
	if err != nil {
		return nil, err
	}
	objs := img.Objects()
	for _, o := range objs {
		if o.Digest.IsZero() {
			return nil, fmt.Errorf("object %q is not named by a digest", o.Path)
		}
	}
	return objs, nil
}

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

type ensureConfig struct{ progress *Progress }

// WithProgress makes EnsureObjects update p as it goes.
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

	var missing []cfs.Object
	for _, o := range objs {
		if err := ctx.Err(); err != nil {
			return st, fmt.Errorf("ensuring objects of image %s: %w", image, context.Cause(ctx))
		}
		where, err := s.locate(o)
		if err != nil {
			return st, fmt.Errorf("ensuring objects of image %s: %w", image, err)
		}
		switch where {
		case inStore:
			st.Present++
			st.PresentBytes += o.Size
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
	s.c.objectsDeduplicated.Add(uint64(st.Present + st.Extra))
	s.c.bytesDeduplicated.Add(st.PresentBytes + st.ExtraBytes)
	if len(missing) == 0 {
		return st, nil
	}

	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		mu       sync.Mutex
		firstErr error
		dirs     = make(map[string]bool)
		wg       sync.WaitGroup
		next     atomic.Int64
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
					return s.fetchObject(fctx, src, o, p, slots)
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
				switch {
				case shared:
					st.Shared++
					st.SharedBytes += o.Size
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
	if firstErr != nil {
		if ctx.Err() != nil && !errors.Is(firstErr, context.Canceled) && !errors.Is(firstErr, context.DeadlineExceeded) {
			firstErr = fmt.Errorf("%w (%w)", context.Cause(ctx), firstErr)
		}
		return st, fmt.Errorf("ensuring objects of image %s from %s: %w", image, src, firstErr)
	}
	if len(dirs) > 0 {
		// One more group sync makes the renames durable (rather than one
		// fsync per object directory).
		if err := s.durable.wait(ctx); err != nil {
			return st, fmt.Errorf("ensuring objects of image %s: %w", image, err)
		}
	}
	s.c.objectsDeduplicated.Add(uint64(st.Shared))
	s.c.bytesDeduplicated.Add(st.SharedBytes)
	klog.FromContext(ctx).V(2).Info("objects ensured", "image", image.String(), "objects", st.Objects,
		"fetched", st.Fetched, "fetchedBytes", st.FetchedBytes, "savedBytes", st.SavedBytes())
	return st, nil
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
func (s *Store) locate(o cfs.Object) (location, error) {
	path := s.objectPath(o.Digest)
	if fi, err := os.Lstat(path); err == nil {
		if !fi.Mode().IsRegular() {
			return missingObject, fmt.Errorf("object %s: %s is not a regular file (the store is damaged; verification quarantines it)", o.Digest, path)
		}
		if uint64(fi.Size()) != o.Size {
			return missingObject, fmt.Errorf("object %s: the image records %d bytes but the object with that digest has %d: %w: %w",
				o.Digest, o.Size, fi.Size(), ErrSizeMismatch, ErrInvalidImage)
		}
		return inStore, nil
	}
	for _, dir := range s.opts.ExtraObjectDirs {
		fi, err := os.Stat(filepath.Join(dir, o.Digest.ObjectPath()))
		if err == nil && fi.Mode().IsRegular() && uint64(fi.Size()) == o.Size {
			return inExtra, nil
		}
	}
	return missingObject, nil
}

// waitersPerSlot is how many objects per download slot an EnsureObjects
// call works on at once: downloading, or waiting to be made durable.
const waitersPerSlot = 4

// fetchObject downloads o into the store, holding one of slots while it
// downloads.
func (s *Store) fetchObject(ctx context.Context, src Source, o cfs.Object, p *Progress, slots chan struct{}) (objectResult, error) {
	if where, err := s.locate(o); err != nil {
		return objectResult{}, err
	} else if where != missingObject { // arrived while we queued
		return objectResult{}, nil
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
	return res, nil
}

func (s *Store) fetchObjectOnce(ctx context.Context, src Source, o cfs.Object, p *Progress, slots chan struct{}) (objectResult, error) {
	f, err := s.downloadObject(ctx, src, o, p, slots)
	if err != nil {
		return objectResult{}, err
	}
	defer func() {
		if f != nil {
			f.discard()
		}
	}()
	// Complete and verified: make it durable, then publish it.
	if err := s.prepareTemp(f); err != nil {
		return objectResult{}, err
	}
	if err := s.durable.wait(ctx); err != nil {
		return objectResult{}, fmt.Errorf("storing object %s: %w", o.Digest, err)
	}
	final := s.objectPath(o.Digest)
	dir := filepath.Dir(final)
	err = f.publish(final)
	f = nil
	if err != nil {
		return objectResult{}, fmt.Errorf("storing object %s: %w", o.Digest, err)
	}
	s.c.objectsFetched.Add(1)
	s.c.objectBytesFetched.Add(o.Size)
	return objectResult{fetched: o.Size, dir: dir}, nil
}

// downloadObject streams o into a new file under tmp/ through the fs-verity
// hasher, holding one of slots meanwhile, and checks its size and digest.
// The returned file is complete and verified but not yet durable; on error
// nothing is left behind.
func (s *Store) downloadObject(ctx context.Context, src Source, o cfs.Object, p *Progress, slots chan struct{}) (_ *tempFile, err error) {
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
	actx, meter, stop := s.stallContext(ctx)
	defer stop()
	body, err := src.OpenObject(actx, o.Digest, o.Size)
	if err != nil {
		return nil, s.stallError(ctx, actx, err)
	}
	defer body.Close()
	// Anonymous (O_TMPFILE) where the filesystem allows. Named temporary
	// files are spread over 16 directories: one directory for all would
	// serialise every create and rename on its lock.
	f, err := createTemp(filepath.Join(s.root, tmpDir, o.Digest.String()[:1]), "object-"+o.Digest.String()[:16]+"-*")
	if err != nil {
		return nil, fmt.Errorf("creating temporary file: %w", err)
	}
	var n int64
	defer func() {
		if err != nil {
			p.Fetched.Add(-n)
			f.discard()
		}
	}()
	h := cfs.NewVerityHash()
	wf := &writebackFile{f: f.File}
	n, err = s.copyBody(io.MultiWriter(wf, h, progressWriter{&p.Fetched}), meterReader{body, meter}, int64(o.Size)+1)
	if err != nil {
		return nil, s.stallError(ctx, actx, err)
	}
	if uint64(n) != o.Size {
		if uint64(n) < o.Size {
			return nil, Transient(fmt.Errorf("%s: short read: got %d of %d bytes", objectLocation(src, o.Digest), n, o.Size))
		}
		return nil, fmt.Errorf("%s: more than the %d bytes the image records: %w", objectLocation(src, o.Digest), o.Size, ErrSizeMismatch)
	}
	if got := h.Digest(); got != o.Digest {
		return nil, fmt.Errorf("%s: content has digest %s: %w", objectLocation(src, o.Digest), got, ErrDigestMismatch)
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

var (
	errStalled = errors.New("stalled")
	errTooSlow = errors.New("too slow")
)

// rateSlots is how many slots the sliding window of a rateMeter has.
const rateSlots = 4

// rateMeter measures the bytes an attempt received over a sliding window
// (in rateSlots slots) and judges whether the attempt is too slow: fewer
// than minRate bytes per second over the last window, or none at all.
// Times are passed in, so that tests can use a fake clock.
type rateMeter struct {
	mu      sync.Mutex
	start   time.Time
	window  time.Duration
	slot    time.Duration
	minRate int64 // bytes per second; 0: only a window without any byte is too slow
	cur     int64 // slot number (since start) of counts[cur%len]
	counts  [rateSlots + 1]int64
}

func newRateMeter(now time.Time, window time.Duration, minRate int64) *rateMeter {
	slot := max(window/rateSlots, 1)
	return &rateMeter{start: now, window: slot * rateSlots, slot: slot, minRate: minRate}
}

// advance moves the current slot to the one now is in, clearing the slots
// passed over.
func (m *rateMeter) advance(now time.Time) {
	idx := int64(max(now.Sub(m.start), 0) / m.slot)
	if idx-m.cur >= int64(len(m.counts)) {
		m.counts = [len(m.counts)]int64{}
		m.cur = idx
		return
	}
	for m.cur < idx {
		m.cur++
		m.counts[m.cur%int64(len(m.counts))] = 0
	}
}

// add records n bytes received at now.
func (m *rateMeter) add(now time.Time, n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.advance(now)
	m.counts[m.cur%int64(len(m.counts))] += int64(n)
}

// check reports whether the attempt is too slow at now (never before a
// whole window has passed), with the bytes and span it judged on.
func (m *rateMeter) check(now time.Time) (slow bool, got int64, span time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	elapsed := now.Sub(m.start)
	if elapsed < m.window {
		return false, 0, 0
	}
	m.advance(now)
	for _, c := range m.counts {
		got += c
	}
	// The counts cover the rateSlots whole slots before the current one
	// and the current one so far.
	span = m.window + elapsed - time.Duration(m.cur)*m.slot
	want := max(int64(float64(m.minRate)*span.Seconds()), 1)
	return got < want, got, span
}

// stallContext returns a context for one attempt, cancelled when the
// response sends no byte over StallTimeout or less than MinRate bytes per
// second over the last StallTimeout, the meter to report received bytes
// to, and a func to call when the attempt is over.
func (s *Store) stallContext(ctx context.Context) (context.Context, *rateMeter, func()) {
	actx, cancel := context.WithCancelCause(ctx)
	m := newRateMeter(time.Now(), s.opts.StallTimeout, s.opts.MinRate)
	var (
		mu      sync.Mutex
		stopped bool
		t       *time.Timer
	)
	var tick func()
	tick = func() {
		slow, got, span := m.check(time.Now())
		mu.Lock()
		defer mu.Unlock()
		if stopped {
			return
		}
		if slow {
			if got == 0 {
				cancel(fmt.Errorf("%w: no data for %v", errStalled, span.Round(time.Millisecond)))
			} else {
				cancel(fmt.Errorf("%w: %d bytes in %v, less than %d bytes/s", errTooSlow, got, span.Round(time.Millisecond), s.opts.MinRate))
			}
			return
		}
		t.Reset(m.slot)
	}
	mu.Lock()
	t = time.AfterFunc(m.slot, tick)
	mu.Unlock()
	return actx, m, func() {
		mu.Lock()
		stopped = true
		t.Stop()
		mu.Unlock()
		cancel(nil)
	}
}

// stallError turns the error of an attempt cut by the stall or rate check
// into a transient one (the caller's own deadline or cancellation is not).
func (s *Store) stallError(ctx, actx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w: %w", context.Cause(ctx), err)
	}
	if c := context.Cause(actx); errors.Is(c, errStalled) || errors.Is(c, errTooSlow) {
		return Transient(fmt.Errorf("%v: %v", c, err))
	}
	return err
}

// meterReader reports the bytes every read returns to the attempt's meter.
type meterReader struct {
	r io.Reader
	m *rateMeter
}

func (r meterReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if n > 0 {
		r.m.add(time.Now(), n)
	}
	return n, err
}

// retry runs fn until it succeeds, fails permanently, the retries are spent
// or ctx ends, sleeping with exponential backoff and full jitter.
func (s *Store) retry(ctx context.Context, what string, fn func(context.Context) error) error {
	log := klog.FromContext(ctx)
	delay := s.opts.RetryBaseDelay
	for attempt := 0; ; attempt++ {
		err := fn(ctx)
		if err == nil {
			return nil
		}
		if isNoSpace(err) || !IsTransient(err) {
			return err
		}
		if attempt >= s.opts.Retries {
			return fmt.Errorf("%w (gave up after %d attempts)", err, attempt+1)
		}
		s.c.retries.Add(1)
		sleep := time.Duration(rand.Int64N(int64(delay))) + delay/2
		log.V(1).Info("retrying", "what", what, "attempt", attempt+1, "in", sleep, "err", err)
		t := time.NewTimer(sleep)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (while retrying after: %w)", context.Cause(ctx), err)
		}
		delay = min(2*delay, s.opts.RetryMaxDelay)
	}
}

func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// quarantine moves a corrupt file out of objects/ or images/ into
// quarantine/ (evidence is never deleted) and logs it.
func (s *Store) quarantine(ctx context.Context, path, reason string) (string, error) {
	rel, err := filepath.Rel(s.root, path)
	if err != nil {
		rel = filepath.Base(path)
	}
	dst := filepath.Join(s.root, quarantineDir,
		fmt.Sprintf("%s.%d", strings.ReplaceAll(rel, string(filepath.Separator), "-"), time.Now().UnixNano()))
	if err := os.Rename(path, dst); err != nil {
		return "", fmt.Errorf("quarantining %s: %w", path, err)
	}
	if strings.HasPrefix(rel, imagesDir) {
		if d, err := cfs.ParseDigest(strings.TrimSuffix(filepath.Base(path), imageSuffix)); err == nil {
			s.mu.Lock()
			delete(s.index, d)
			s.mu.Unlock()
		}
	}
	s.c.quarantined.Add(1)
	klog.FromContext(ctx).Info("corrupt file quarantined", "path", path, "reason", reason, "movedTo", dst)
	return dst, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	return nil
}

// counters are the store's cumulative counters (exported by the driver).
type counters struct {
	imagesFetched, imageBytesFetched       atomic.Uint64
	objectsFetched, objectBytesFetched     atomic.Uint64
	objectsDeduplicated, bytesDeduplicated atomic.Uint64
	retries, quarantined                   atomic.Uint64
	gcImages, gcObjects, gcBytes           atomic.Uint64
}

// Counters is a snapshot of the store's cumulative counters since Open.
type Counters struct {
	ImagesFetched       uint64
	ImageBytesFetched   uint64
	ObjectsFetched      uint64
	ObjectBytesFetched  uint64
	ObjectsDeduplicated uint64 // objects not downloaded: present, in an extra dir, or shared
	BytesDeduplicated   uint64 // bytes saved by deduplication
	Retries             uint64
	Quarantined         uint64 // corrupt files moved to quarantine/
	GCImagesRemoved     uint64
	GCObjectsRemoved    uint64
	GCBytesFreed        uint64
}

// Counters returns the cumulative counters.
func (s *Store) Counters() Counters {
	c := &s.c
	return Counters{
		ImagesFetched:       c.imagesFetched.Load(),
		ImageBytesFetched:   c.imageBytesFetched.Load(),
		ObjectsFetched:      c.objectsFetched.Load(),
		ObjectBytesFetched:  c.objectBytesFetched.Load(),
		ObjectsDeduplicated: c.objectsDeduplicated.Load(),
		BytesDeduplicated:   c.bytesDeduplicated.Load(),
		Retries:             c.retries.Load(),
		Quarantined:         c.quarantined.Load(),
		GCImagesRemoved:     c.gcImages.Load(),
		GCObjectsRemoved:    c.gcObjects.Load(),
		GCBytesFreed:        c.gcBytes.Load(),
	}
}
