// Package driver implements the CSI Identity and Node services of
// csi-composefs: it publishes composefs images fetched into the node store
// (pkg/fetch) as read-only erofs+overlayfs mounts (pkg/cfs) at the target
// paths kubelet asks for.
package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// DefaultDriverName is the CSI plugin name unless --driver-name says
// otherwise.
const DefaultDriverName = "composefs.csi.dev"

// Store is what the driver needs of the node store (*fetch.Store).
type Store interface {
	EnsureImage(ctx context.Context, src fetch.Source, ref fetch.ImageRef, opts ...fetch.EnsureOption) (cfs.Digest, error)
	EnsureObjects(ctx context.Context, src fetch.Source, image cfs.Digest, opts ...fetch.EnsureOption) (fetch.Stats, error)
	Signatures(ctx context.Context, src fetch.Source, ref fetch.ImageRef) ([]fetch.SignatureFile, error)
	ManifestSignatures(ctx context.Context, src fetch.ManifestSigner, name string) (fetch.SignedManifest, error)
	KeepSignature(ctx context.Context, image cfs.Digest, sig fetch.KeptSignature) error
	KeptSignatures(ctx context.Context, image cfs.Digest) ([]fetch.KeptSignature, error)
	Objects(ctx context.Context, image cfs.Digest) ([]cfs.Object, error)
	ImageStats(ctx context.Context, image cfs.Digest) (cfs.ImageStats, error)
	HasImage(d cfs.Digest) bool
	ImageShown(ctx context.Context, d cfs.Digest, principal string) bool
	ImagePath(d cfs.Digest) string
	ObjectsDir() string
	Pin(image cfs.Digest)
	Unpin(image cfs.Digest)
	GC(ctx context.Context) (fetch.GCStats, error)
	Verify(ctx context.Context) (fetch.VerifyReport, error)
	VerityEnabled() bool
	Counters() fetch.Counters
	Root() string
}

var _ Store = (*fetch.Store)(nil)

// Mounter mounts and finds composefs mounts (KernelMounter in production).
type Mounter interface {
	Mount(ctx context.Context, image, target string, opts cfs.MountOptions) (cfs.MountResult, error)
	// Unmount unmounts target; nothing mounted is not an error. A busy
	// mount is not detached: the error wraps unix.EBUSY.
	Unmount(target string) error
	// MountAt returns the topmost mount at target.
	MountAt(target string) (cfs.MountInfo, bool, error)
	// ComposefsMounts lists the composefs mounts of the namespace.
	ComposefsMounts() ([]cfs.MountInfo, error)
}

// KernelMounter is the Mounter of pkg/cfs.
type KernelMounter struct{}

// Mount calls cfs.Mount.
func (KernelMounter) Mount(ctx context.Context, image, target string, opts cfs.MountOptions) (cfs.MountResult, error) {
	return cfs.Mount(ctx, image, target, opts)
}

// Unmount unmounts target. A busy mount (a process still holds a file or
// its working directory inside) fails with EBUSY and stays: detaching it
// lazily would let GC remove content that process still reads.
func (KernelMounter) Unmount(target string) error { return cfs.Unmount(target, false) }

// MountAt calls cfs.IsMounted.
func (KernelMounter) MountAt(target string) (cfs.MountInfo, bool, error) {
	return cfs.IsMounted(target)
}

// ComposefsMounts calls cfs.ComposefsMounts.
func (KernelMounter) ComposefsMounts() ([]cfs.MountInfo, error) { return cfs.ComposefsMounts() }

// Config is the driver's configuration (the serve flags).
type Config struct {
	DriverName string // default DefaultDriverName
	Version    string
	NodeID     string
	// AllowedSources: sources must start with one of these URL prefixes;
	// empty allows every source.
	AllowedSources AllowList
	// Registries are the node's registry settings (insecure registries,
	// mirrors).
	Registries RegistryConfig
	// MinVerity is the node's floor: a volume cannot ask for less.
	MinVerity cfs.VerityMode
	// ExtraObjectDirs are mounted as further data-only layers, after the
	// store's objects (the store must be opened with the same list).
	ExtraObjectDirs []string
	// StateDir holds the per-target records; default STORE/csi-state.
	StateDir string
	// GCInterval is how often the store is garbage collected once the
	// state is recovered; 0 means never (tests), negative means 10m.
	GCInterval time.Duration
	// VerifyInterval is how often every object and image of the store is
	// re-hashed (corrupt files go to quarantine/, and volumes that use them
	// report an abnormal condition); 0 means never, negative means 24h.
	VerifyInterval time.Duration
	// WaitMargin is how long before the caller's deadline a publish stops
	// waiting for a fetch and answers Aborted; 0 means 2s.
	WaitMargin time.Duration
	// TrustSharedContent serves content already in the store to every
	// volume that names it, without asking its source to show that it
	// holds it: for single-tenant clusters only (--trust-shared-content).
	TrustSharedContent bool
}

// Driver is the CSI Identity and Node server.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer

	cfg       Config
	store     Store
	mounter   Mounter
	newSource SourceFactory
	now       func() time.Time
	metrics   *Metrics
	events    EventRecorder
	// healthEndpoint, when set, is where /healthz calls Probe.
	healthEndpoint string
	// selinux reports whether the node runs SELinux (nil: cfs.SELinuxEnabled).
	selinux func() bool

	state *stateStore
	locks *targetLocks
	ops   *fetchOps
	ready atomic.Bool

	mu       sync.Mutex
	pinned   map[string]cfs.Digest  // target → image it pins
	names    map[string]cfs.Digest  // source+name → digest last resolved
	complete map[completeKey]bool   // images whose objects were all ensured, per principal
	checked  map[cfs.Digest]bool    // images whose file digest was checked
	infos    map[cfs.Digest]*imgRef // parsed image stats, for NodeGetVolumeStats
	sources  map[string]fetch.Source
	trust    TrustPolicy         // nil: no signature checks
	verdicts map[verdictKey]bool // signatures verified, by content and key

	ctx     context.Context // lives as long as the driver: background fetches
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	closeMu sync.RWMutex // held for reading while starting background work
	closed  bool
}

type imgRef struct{ stats cfs.ImageStats }

// Option tunes New.
type Option func(*Driver)

// WithSourceFactory replaces NewSource (tests).
func WithSourceFactory(f SourceFactory) Option { return func(d *Driver) { d.newSource = f } }

// WithMounter replaces KernelMounter (tests).
func WithMounter(m Mounter) Option { return func(d *Driver) { d.mounter = m } }

// WithClock replaces time.Now.
func WithClock(now func() time.Time) Option { return func(d *Driver) { d.now = now } }

// WithMetrics makes the driver report to m.
func WithMetrics(m *Metrics) Option { return func(d *Driver) { d.metrics = m } }

// New makes a driver over an opened store. Call Recover before serving
// requests that change anything; Probe answers not ready until then.
func New(cfg Config, store Store, opts ...Option) (*Driver, error) {
	if cfg.DriverName == "" {
		cfg.DriverName = DefaultDriverName
	}
	if cfg.NodeID == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("node id: %w", err)
		}
		cfg.NodeID = h
	}
	if cfg.MinVerity == "" {
		cfg.MinVerity = cfs.VerityOff
	}
	if err := checkMinVerity(cfg, store); err != nil {
		return nil, err
	}
	if cfg.StateDir == "" {
		cfg.StateDir = filepath.Join(store.Root(), "csi-state")
	}
	if cfg.GCInterval < 0 {
		cfg.GCInterval = 10 * time.Minute
	}
	if cfg.VerifyInterval < 0 {
		cfg.VerifyInterval = 24 * time.Hour
	}
	if cfg.WaitMargin <= 0 {
		cfg.WaitMargin = 2 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	d := &Driver{
		cfg:       cfg,
		store:     store,
		mounter:   KernelMounter{},
		newSource: Sources{Allow: cfg.AllowedSources, Registries: cfg.Registries}.NewSource,
		events:    logRecorder{},
		now:       time.Now,
		locks:     newTargetLocks(),
		ops:       newFetchOps(),
		pinned:    make(map[string]cfs.Digest),
		names:     make(map[string]cfs.Digest),
		complete:  make(map[completeKey]bool),
		checked:   make(map[cfs.Digest]bool),
		infos:     make(map[cfs.Digest]*imgRef),
		sources:   make(map[string]fetch.Source),
		verdicts:  make(map[verdictKey]bool),
		ctx:       ctx,
		cancel:    cancel,
	}
	for _, o := range opts {
		o(d)
	}
	if d.metrics == nil {
		d.metrics = NewMetrics(nil)
	}
	d.metrics.attach(d)
	return d, nil
}

// checkMinVerity refuses to make a driver that could serve no volume:
// with MinVerity require, the store and every extra object directory must
// have fs-verity (the kernel enforces it on every read).
func checkMinVerity(cfg Config, store Store) error {
	if cfg.MinVerity != cfs.VerityRequire {
		return nil
	}
	if !store.VerityEnabled() {
		return fmt.Errorf("--min-verity=require: the store %s has no fs-verity (the kernel lacks CONFIG_FS_VERITY or the filesystem the feature, e.g. ext4 without -O verity); refusing to serve volumes the kernel cannot verify", store.Root())
	}
	for _, dir := range cfg.ExtraObjectDirs {
		ok, err := cfs.VeritySupport(dir)
		if err != nil {
			return fmt.Errorf("--min-verity=require: extra object directory %s: %w", dir, err)
		}
		if !ok {
			return fmt.Errorf("--min-verity=require: extra object directory %s has no fs-verity; refusing to serve volumes the kernel cannot verify", dir)
		}
	}
	return nil
}

// Config returns the configuration in effect (defaults filled in).
func (d *Driver) Config() Config { return d.cfg }

// Ready reports whether the state has been recovered.
func (d *Driver) Ready() bool { return d.ready.Load() }

// Recover loads the per-target state and reconciles it with the mount
// table: a record whose mount is still there (kernel mounts outlive the
// plugin) pins its image again; a record whose mount is gone (node
// reboot, manual unmount) is dropped. Pins are restored before the first
// GC can run. It then starts the periodic GC and marks the driver ready.
func (d *Driver) Recover(ctx context.Context) error {
	log := klog.FromContext(ctx)
	st, bad, err := openState(d.cfg.StateDir)
	if err != nil {
		return err
	}
	for _, e := range bad {
		log.Error(e, "Ignoring unreadable volume record")
	}
	d.state = st
	mounts, err := d.mounter.ComposefsMounts()
	if err != nil {
		return fmt.Errorf("recovering state: %w", err)
	}
	byPath := make(map[string]cfs.MountInfo, len(mounts))
	for _, m := range mounts {
		byPath[m.MountPoint] = m
	}
	kept, dropped := 0, 0
	for _, r := range st.all() {
		dg, _ := r.digest()
		path := r.Target
		if p, err := filepath.EvalSymlinks(r.Target); err == nil {
			path = p
		}
		m, ok := byPath[path]
		if md, hasDigest := m.ImageDigest(); ok && (!hasDigest || md == dg) {
			d.pin(r.Target, dg)
			d.mu.Lock()
			if r.Name != "" {
				d.names[r.Source+" "+r.Name] = dg
			}
			d.mu.Unlock()
			kept++
			log.V(2).Info("Volume recovered", "target", r.Target, "volumeID", r.VolumeID, "image", r.Image)
			continue
		}
		log.Info("Volume no longer mounted; forgetting it", "target", r.Target, "volumeID", r.VolumeID, "image", r.Image)
		// The record is the only memory that the driver made the directory:
		// remove it now if it is still the empty directory it made.
		if err := removeTarget(klog.NewContext(ctx, log.WithValues("target", r.Target)), r.Target, r.CreatedDir); err != nil {
			log.Error(err, "Removing the target directory of a volume no longer mounted", "target", r.Target)
		}
		if err := st.remove(r.Target); err != nil {
			return fmt.Errorf("recovering state: %w", err)
		}
		dropped++
	}
	// A mount made just before a crash may have no record yet: keep its
	// image pinned until kubelet's retry adopts it or unpublishes it.
	recorded := make(map[string]bool, st.len())
	for _, r := range st.all() {
		recorded[r.Target] = true
		if p, err := filepath.EvalSymlinks(r.Target); err == nil {
			recorded[p] = true
		}
	}
	unrecorded := 0
	for _, m := range mounts {
		dg, ok := m.ImageDigest()
		if recorded[m.MountPoint] || !ok || !d.store.HasImage(dg) {
			continue
		}
		d.pin(m.MountPoint, dg)
		unrecorded++
		log.Info("Composefs mount without a volume record; its image stays pinned until it is published again or unpublished",
			"target", m.MountPoint, "image", dg.String())
	}
	log.Info("Driver state recovered", "volumes", kept, "dropped", dropped, "unrecordedMounts", unrecorded, "composefsMounts", len(mounts))
	d.metrics.setVolumes(st.all())
	d.ready.Store(true)
	if d.cfg.GCInterval > 0 {
		d.goBackground(func() { every(klog.NewContext(d.ctx, log), d.cfg.GCInterval, "Store GC", d.RunGC) })
	}
	if d.cfg.VerifyInterval > 0 {
		d.goBackground(func() { every(klog.NewContext(d.ctx, log), d.cfg.VerifyInterval, "Store verification", d.RunVerify) })
	}
	return nil
}

// Close stops background work (fetches in flight are cancelled; their
// partial downloads are cleared when the store is opened next).
func (d *Driver) Close() {
	d.closeMu.Lock()
	d.closed = true
	d.closeMu.Unlock()
	d.cancel()
	d.wg.Wait()
	d.closeEvents()
}

// goBackground runs fn in a goroutine Close waits for, unless the driver
// is closing.
func (d *Driver) goBackground(fn func()) bool {
	d.closeMu.RLock()
	defer d.closeMu.RUnlock()
	if d.closed {
		return false
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		fn()
	}()
	return true
}

// every runs fn each interval until the driver closes.
func every[T any](ctx context.Context, interval time.Duration, what string, fn func(context.Context) (T, error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if _, err := fn(ctx); err != nil && ctx.Err() == nil {
				klog.FromContext(ctx).Error(err, what+" failed")
			}
		}
	}
}

// RunVerify re-hashes the store. Corrupt files are moved to quarantine/
// and counted as verification failures; images are checked again at their
// next publish, and published volumes whose objects were quarantined
// report an abnormal volume condition.
func (d *Driver) RunVerify(ctx context.Context) (fetch.VerifyReport, error) {
	if !d.ready.Load() {
		return fetch.VerifyReport{}, errors.New("store verification: driver state not recovered yet")
	}
	rep, err := d.store.Verify(ctx)
	log := klog.FromContext(ctx)
	for _, c := range rep.Corrupt {
		d.metrics.verificationFailure()
		log.Error(nil, "Corrupt file moved to quarantine", "path", c.Path, "reason", c.Reason, "movedTo", c.MovedTo)
	}
	if len(rep.Corrupt) > 0 {
		d.mu.Lock()
		clear(d.complete)
		d.mu.Unlock()
	}
	if err != nil {
		return rep, fmt.Errorf("store verification: %w", err)
	}
	log.V(2).Info("Store verification done", "objects", rep.Objects, "images", rep.Images, "bytes", rep.Bytes, "corrupt", len(rep.Corrupt))
	return rep, nil
}

// RunGC garbage collects the store. Images of published volumes are
// pinned and keep their objects; others may lose theirs, so they must be
// checked again at their next publish.
func (d *Driver) RunGC(ctx context.Context) (fetch.GCStats, error) {
	if !d.ready.Load() {
		return fetch.GCStats{}, errors.New("store GC: driver state not recovered yet")
	}
	// Forget "all objects present" for every image GC may touch before it
	// starts, so a publish during the sweep checks its objects again.
	d.mu.Lock()
	pinned := make(map[cfs.Digest]bool, len(d.pinned))
	for _, dg := range d.pinned {
		pinned[dg] = true
	}
	for k := range d.complete {
		if !pinned[k.image] {
			delete(d.complete, k)
		}
	}
	d.mu.Unlock()
	st, err := d.store.GC(ctx)
	d.metrics.observeGC(st, err)
	if err != nil {
		return st, fmt.Errorf("store GC: %w", err)
	}
	klog.FromContext(ctx).V(2).Info("Store GC done", "imagesRemoved", st.ImagesRemoved,
		"objectsRemoved", st.ObjectsRemoved, "bytesFreed", st.BytesFreed, "bytesInUse", st.BytesInUse)
	return st, nil
}

// pin pins dg for target (once per target).
func (d *Driver) pin(target string, dg cfs.Digest) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if old, ok := d.pinned[target]; ok {
		if old == dg {
			return
		}
		d.store.Unpin(old)
	}
	d.pinned[target] = dg
	d.store.Pin(dg)
}

// unpin releases target's pin, if it has one.
func (d *Driver) unpin(target string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if dg, ok := d.pinned[target]; ok {
		delete(d.pinned, target)
		d.store.Unpin(dg)
	}
}

// source returns a (cached) source for spec and creds, so that volumes of
// one repository share connections.
func (d *Driver) source(spec SourceSpec, creds Credentials) (fetch.Source, error) {
	key := string(spec.Kind) + " " + spec.URL + " " + creds.fingerprint()
	d.mu.Lock()
	src, ok := d.sources[key]
	d.mu.Unlock()
	if ok {
		return src, nil
	}
	src, err := d.newSource(spec, creds)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.sources) >= 256 { // bound the cache; sources are cheap to make
		for k, s := range d.sources {
			if c, ok := s.(interface{ CloseIdleConnections() }); ok {
				c.CloseIdleConnections()
			}
			delete(d.sources, k)
		}
	}
	d.sources[key] = src
	return src, nil
}
