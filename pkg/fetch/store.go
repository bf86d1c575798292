package fetch

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
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
	// call; 0 means 256. A call starts 16 at once (or Parallelism if
	// fewer) and doubles that while the throughput grows with it, halving
	// it on failures worth a retry (see adaptiveLimit).
	Parallelism int
	// MaxConcurrentDownloads bounds concurrent object downloads across all
	// EnsureObjects calls of the store (node-wide, on top of Parallelism
	// per call); 0 means 256. With it the memory downloads take is
	// bounded: each holds a copy buffer of at most 64 KiB and what its
	// response has buffered (HTTP/2: at most 16 MiB per connection, see
	// HTTP2Config).
	MaxConcurrentDownloads int
	// MaxFetchWorkers bounds the goroutines of object downloads node-wide
	// (downloading, or waiting for the group sync that makes them
	// durable); 0 means 4 × MaxConcurrentDownloads.
	MaxFetchWorkers int
	// MaxImageSize bounds an image download; 0 means 128 MiB. Parsing an
	// image (and checking it canonical) takes 3 to 32 times its size in
	// memory, bounded by ParseMemory.
	MaxImageSize int64
	// MaxImageInodes bounds the inodes of an image (cfs.OpenOptions
	// MaxInodes); 0 means the reader's default (4,000,000).
	MaxImageInodes int
	// MaxSize is the store's size budget for GC (bytes allocated under
	// objects/, images/ and signatures/: an image's kept signatures count
	// with it); 0 means no budget (GC then only removes objects no image
	// references).
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
	// pinned, covering the gap between EnsureImage and Pin; 0 means 10m,
	// negative means none.
	GCGrace time.Duration
	// DisableVerity skips enabling fs-verity on stored files even where the
	// filesystem supports it.
	DisableVerity bool
	// MustExist makes Open refuse a directory that is not a store already
	// (CheckStoreDir) instead of creating one there.
	MustExist bool
	// DownloadBudget bounds the bytes downloads hold in tmp/ at once, node
	// wide: an object download reserves its size before it starts, an
	// image download MaxImageSize until the response announces its length;
	// downloads that do not fit wait their turn (one larger than the whole
	// budget runs alone). 0 means 1 GiB, negative means none.
	DownloadBudget int64
	// ParseMemory bounds the memory that parsing images and checking them
	// canonical (when downloaded, and stored ones after a restart) may
	// take at once, node wide: each parse reserves 32 bytes per byte of
	// image (what the estimate of the worst trees reaches; at most the
	// whole budget) before it starts, and shrinks the reservation to its
	// tree's estimate (cfs.ImageStats.Memory) once parsed; parses that do
	// not fit wait their turn. A downloaded image whose tree would take
	// more than its reservation is refused as soon as its parse reaches
	// it (ErrResourceLimit wrapping cfs.ErrTooLarge): with the whole
	// budget, an image larger than it. Stored images were admitted so and
	// are not refused again. 0 means 256 MiB, negative means none.
	ParseMemory int64
	// MaxObjectSize refuses, before downloading anything, an image that
	// needs an object larger (ErrResourceLimit); 0 means 16 GiB, negative
	// means no limit.
	MaxObjectSize int64
	// MinFreeSpace is what downloads keep free on the store's filesystem:
	// an image whose missing objects do not fit in the free space beyond
	// it (less what downloads in progress reserved) is refused before
	// downloading (ErrResourceLimit, and syscall.ENOSPC), and so is each
	// object when its download starts; 0 means 1 GiB, negative means no
	// check (writes may then fail with ENOSPC).
	MinFreeSpace int64
	// NamedTempFiles downloads objects into named files under tmp/ even
	// where the filesystem has O_TMPFILE (as on filesystems without it;
	// tests of that path).
	NamedTempFiles bool
	// AllowNonCanonicalImages accepts images that are not byte for byte
	// what the project's writer makes of their tree (images from writers
	// other than mkcomposefs 1.0.8, composefs-rs V1 and this project).
	// Off, the default, an image is parsed and written again before its
	// first use and refused (ErrInvalidImage, ErrNotCanonical) unless the
	// bytes are identical, so that the kernel's EROFS parser only ever
	// reads bytes this project's writer could have made.
	AllowNonCanonicalImages bool
	// UnsafeNoSync skips every fsync, syncfs and directory sync: files are
	// then renamed or linked into place before their content is on stable
	// storage, and a power cut can leave a file whose content is not its
	// name. Only for tests that prove a durability test can fail; never
	// set it anywhere else (no flag sets it).
	UnsafeNoSync bool
}

func (o *Options) setDefaults() {
	if o.Parallelism <= 0 {
		o.Parallelism = 256
	}
	if o.MaxConcurrentDownloads <= 0 {
		o.MaxConcurrentDownloads = 256
	}
	if o.MaxFetchWorkers <= 0 {
		o.MaxFetchWorkers = waitersPerSlot * o.MaxConcurrentDownloads
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
	if o.DownloadBudget == 0 {
		o.DownloadBudget = 1 << 30
	}
	if o.ParseMemory == 0 {
		o.ParseMemory = 256 << 20
	}
	if o.MaxObjectSize == 0 {
		o.MaxObjectSize = 16 << 30
	}
	if o.MinFreeSpace == 0 {
		o.MinFreeSpace = 1 << 30
	}
	if o.GCGrace == 0 {
		o.GCGrace = 10 * time.Minute
	} else if o.GCGrace < 0 {
		o.GCGrace = 0
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
// still protects recently used images from a budget GC. A pin protects the
// objects of its image independently of the image file: their list is kept
// from pin time, so an image quarantined while mounted keeps its objects,
// and a pinned image whose list is unknown (its file gone before this
// process read it) makes GC remove no object at all.
type Store struct {
	root string
	opts Options
	lock *os.File

	verity atomic.Bool // enable fs-verity on stored files
	// anonModeSet: anonymous temporary files get objectMode as created
	// (the umask and tmp/'s default ACL keep it; probed at Open).
	anonModeSet bool

	mu      sync.Mutex
	pins    map[cfs.Digest]int          // Pin/Unpin counts
	pinObjs map[cfs.Digest][]cfs.Object // objects of pinned images, kept even if the image file goes
	busy    map[cfs.Digest]int          // images an Ensure call is working on
	lastUse map[cfs.Digest]time.Time    // in-process last use, for GC grace and LRU
	index   map[cfs.Digest][]cfs.Object // objects of parsed images (immutable)
	// canonical holds the images found canonical by this process (the
	// verdict is not kept across restarts: the first use after one checks
	// again, as the flag may have changed).
	canonical map[cfs.Digest]bool
	gen       uint64 // bumped when pins or busy gain an image

	bufs, smallBufs sync.Pool // *[]byte copy buffers

	durable *groupSync // makes downloaded objects durable in groups

	downloads chan struct{} // node-wide object download slots
	workers   chan struct{} // node-wide object download goroutines

	freeCache freeSpaceCache // the free space per-object checks judge on
	// measureFree replaces freeSpace for the per-object checks (tests
	// count measurements); nil means freeSpace.
	measureFree func() (int64, error)

	tmpBudget   *budget // bytes of downloads in tmp/ (DownloadBudget)
	parseBudget *budget // memory of image parses (ParseMemory)

	// named counts the objects given their names in objects/ since Open
	// (downloaded or converted), so that a call can tell whether any
	// appeared since it looked.
	named atomic.Uint64
	// lookups counts locate's lookups of objects (tests).
	lookups atomic.Uint64

	images  flightGroup[cfs.Digest]
	objects flightGroup[objectResult]

	// open replaces os.Open for Verify and image parsing (tests inject
	// I/O errors); nil means os.Open.
	open func(path string) (storeFile, error)
	// afterPublish, when set (tests), runs as soon as a downloaded object
	// has its name in objects/.
	afterPublish func(cfs.Digest)

	prov   provenance // who showed what (provenance.go)
	keptMu sync.Mutex // serialises changes under signatures/ (signatures_kept.go)
	proofs proofCounters

	c counters
}

type objectResult struct {
	fetched uint64   // bytes downloaded
	dir     string   // object directory renamed into, to fsync
	found   location // where it was found when it arrived meanwhile
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
	for _, d := range []string{"", objectsDir, imagesDir, tmpDir, quarantineDir, signaturesDir} {
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
		pinObjs: make(map[cfs.Digest][]cfs.Object),
		busy:    make(map[cfs.Digest]int),
		lastUse: make(map[cfs.Digest]time.Time),
		index:   make(map[cfs.Digest][]cfs.Object),

		canonical: make(map[cfs.Digest]bool),

		downloads: make(chan struct{}, opts.MaxConcurrentDownloads),
		workers:   make(chan struct{}, opts.MaxFetchWorkers),

		tmpBudget:   newBudget(opts.DownloadBudget),
		parseBudget: newBudget(opts.ParseMemory),
	}
	s.bufs.New = func() any { b := make([]byte, copyBufferSize); return &b }
	s.smallBufs.New = func() any { b := make([]byte, smallCopyBufferSize); return &b }
	if s.durable, err = newGroupSync(root, opts.UnsafeNoSync); err != nil {
		s.Close()
		return nil, fmt.Errorf("opening store %s: %w", root, err)
	}
	if err := s.clearTmp(); err != nil {
		s.Close()
		return nil, err
	}
	// Load (or create) the provenance key now rather than in the first
	// publish that needs it.
	s.provenanceKey(ctx)
	for _, c := range "0123456789abcdef" {
		if err := os.Mkdir(filepath.Join(root, tmpDir, string(c)), 0o755); err != nil {
			s.Close()
			return nil, fmt.Errorf("opening store %s: %w", root, err)
		}
	}
	s.anonModeSet = tmpfileKeepsMode(filepath.Join(root, tmpDir, "0"))
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

// HasImage reports whether the image is in the store.
func (s *Store) HasImage(d cfs.Digest) bool {
	fi, err := os.Stat(s.ImagePath(d))
	return err == nil && fi.Mode().IsRegular()
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

// syncDir syncs a directory of the store (unless UnsafeNoSync).
func (s *Store) syncDir(dir string) error {
	if s.opts.UnsafeNoSync {
		return nil
	}
	return syncDir(dir)
}

// fsync syncs a file of the store (unless UnsafeNoSync).
func (s *Store) fsync(f *os.File) error {
	if s.opts.UnsafeNoSync {
		return nil
	}
	return f.Sync()
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
	resumes, resumedBytes                  atomic.Uint64
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
	Resumes             uint64 // downloads resumed with a range request after being cut
	ResumedBytes        uint64 // bytes those did not fetch again
	Quarantined         uint64 // corrupt files moved to quarantine/
	GCImagesRemoved     uint64
	GCObjectsRemoved    uint64
	GCBytesFreed        uint64
	Proofs              uint64 // proofs of possession that passed
	ProofsFailed        uint64
	ProofBytes          uint64 // bytes received by proofs
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
		Resumes:             c.resumes.Load(),
		ResumedBytes:        c.resumedBytes.Load(),
		Quarantined:         c.quarantined.Load(),
		GCImagesRemoved:     c.gcImages.Load(),
		GCObjectsRemoved:    c.gcObjects.Load(),
		GCBytesFreed:        c.gcBytes.Load(),
		Proofs:              s.proofs.proofs.Load(),
		ProofsFailed:        s.proofs.proofsFailed.Load(),
		ProofBytes:          s.proofs.proofBytes.Load(),
	}
}
