package cfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// digestStore fills an object store (DirOptions.DigestStore) during a build,
// durably and in groups. Each new object is written to an anonymous
// O_TMPFILE inode (a named .tmp-* file where the filesystem has no
// O_TMPFILE) from the very bytes that were hashed, so the object is what its
// digest names without reading it again; its writeback starts at once. When
// a group of objects is written, one syncfs(2) makes them all durable, and
// only then does each get its final name xx/yyyy… (linkat(2); rename(2) for
// named files). One more syncfs at the end makes the names durable. An
// object never has its digest name before its bytes are on stable storage,
// and a failed or killed build leaves no partial object (at most named
// temporaries, where O_TMPFILE is missing).
type digestStore struct {
	dir      string
	fs       *os.File // a descriptor on the store's filesystem, for syncfs
	dev      uint64   // the store's device, for HardlinkObjects
	hardlink bool

	mu           sync.Mutex
	known        map[Digest]struct{} // stored or pending in this build
	pending      []*pendingObject
	pendingBytes int64
	dirs         [256]bool // xx/ directories known to exist
	noTmpfile    bool
	syncs        int // syncfs calls made, for tests
}

// pendingObject is a written object waiting for its group's syncfs.
type pendingObject struct {
	f     *os.File
	named bool // a named temporary, renamed into place; else linked by descriptor
	final string
	size  int64
}

// Group limits: a syncfs once this many objects or bytes are pending.
const (
	storeGroupObjects = 256
	storeGroupBytes   = 64 << 20
)

func openDigestStore(dir string, hardlink bool) (*digestStore, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating the digest store: %w", err)
	}
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("opening the digest store: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("opening the digest store: %w", err)
	}
	return &digestStore{dir: dir, fs: f, dev: st.Dev, hardlink: hardlink, known: map[Digest]struct{}{}}, nil
}

// claim reports whether d still has to be stored (neither stored already nor
// claimed by another worker of this build), claiming it if so: one worker
// writes each object.
func (s *digestStore) claim(d Digest, size int64) bool {
	s.mu.Lock()
	_, ok := s.known[d]
	if !ok {
		s.known[d] = struct{}{}
	}
	s.mu.Unlock()
	if ok {
		return false
	}
	if fi, err := os.Lstat(filepath.Join(s.dir, d.ObjectPath())); err == nil && fi.Mode().IsRegular() && fi.Size() == size {
		return false // from an earlier build
	}
	return true
}

// create opens a new temporary object file.
func (s *digestStore) create() (*pendingObject, error) {
	s.mu.Lock()
	anon := !s.noTmpfile
	s.mu.Unlock()
	if anon {
		fd, err := unix.Open(s.dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
		if err == nil {
			return &pendingObject{f: os.NewFile(uintptr(fd), filepath.Join(s.dir, "(new object)"))}, nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EISDIR) {
			return nil, fmt.Errorf("creating an object in %s: %w", s.dir, err)
		}
		s.mu.Lock()
		s.noTmpfile = true
		s.mu.Unlock()
	}
	f, err := os.CreateTemp(s.dir, ".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("creating an object: %w", err)
	}
	return &pendingObject{f: f, named: true}, nil
}

// discard drops an object that will not be stored.
func (o *pendingObject) discard() {
	o.f.Close()
	if o.named {
		os.Remove(o.f.Name())
	}
}

// add queues a written object (its size bytes in o.f) for d's name; the
// worker that fills a group commits it.
func (s *digestStore) add(ctx context.Context, d Digest, o *pendingObject, size int64) error {
	if err := unix.Fchmod(int(o.f.Fd()), 0o644); err != nil {
		o.discard()
		return fmt.Errorf("storing object %s: %w", d, err)
	}
	// Start writing back now (a hint; durability comes from the syncfs).
	_ = unix.SyncFileRange(int(o.f.Fd()), 0, size, unix.SYNC_FILE_RANGE_WRITE)
	return s.queue(ctx, d, o, size)
}

// addLink queues the source file itself (HardlinkObjects: the object shares
// its inode) for d's name; src is closed once it is named or dropped.
func (s *digestStore) addLink(ctx context.Context, d Digest, src *os.File, size int64) error {
	return s.queue(ctx, d, &pendingObject{f: src}, size)
}

func (s *digestStore) queue(ctx context.Context, d Digest, o *pendingObject, size int64) error {
	o.final, o.size = filepath.Join(s.dir, d.ObjectPath()), size
	s.mu.Lock()
	s.pending = append(s.pending, o)
	s.pendingBytes += size
	var group []*pendingObject
	if len(s.pending) >= storeGroupObjects || s.pendingBytes >= storeGroupBytes {
		group = s.pending
		s.pending, s.pendingBytes = nil, 0
	}
	s.mu.Unlock()
	if group == nil {
		return nil
	}
	return s.commit(ctx, group)
}

// commit makes a group durable with one syncfs, then names its objects.
func (s *digestStore) commit(ctx context.Context, group []*pendingObject) error {
	defer func() {
		for _, o := range group {
			if o != nil {
				o.discard()
			}
		}
	}()
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.syncfs(); err != nil {
		return err
	}
	for i, o := range group {
		if err := s.place(o); err != nil {
			return err
		}
		o.f.Close()
		group[i] = nil
	}
	return nil
}

// place gives a durable object its final name; a name taken already (the
// same content stored concurrently) is as good.
func (s *digestStore) place(o *pendingObject) error {
	xx := filepath.Base(filepath.Dir(o.final))
	if i, err := strconv.ParseUint(xx, 16, 8); err == nil {
		s.mu.Lock()
		made := s.dirs[i]
		s.mu.Unlock()
		if !made {
			if err := os.Mkdir(filepath.Dir(o.final), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("creating object directory: %w", err)
			}
			s.mu.Lock()
			s.dirs[i] = true
			s.mu.Unlock()
		}
	}
	var err error
	if o.named {
		err = os.Rename(o.f.Name(), o.final)
	} else {
		err = unix.Linkat(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(int(o.f.Fd())), unix.AT_FDCWD, o.final, unix.AT_SYMLINK_FOLLOW)
		if errors.Is(err, unix.EEXIST) {
			err = nil
		}
	}
	if err != nil {
		return fmt.Errorf("naming object %s: %w", o.final, err)
	}
	o.named = false // nothing left to remove
	return nil
}

// finish commits the last group and makes every name durable.
func (s *digestStore) finish(ctx context.Context) error {
	s.mu.Lock()
	group := s.pending
	s.pending, s.pendingBytes = nil, 0
	syncs := s.syncs
	s.mu.Unlock()
	if len(group) > 0 {
		if err := s.commit(ctx, group); err != nil {
			return err
		}
	}
	if len(group) == 0 && syncs == 0 {
		return s.fs.Close() // nothing was stored
	}
	err := s.syncfs()
	if cerr := s.fs.Close(); err == nil {
		err = cerr
	}
	return err
}

// abort drops what is pending after a failed build.
func (s *digestStore) abort() {
	s.mu.Lock()
	group := s.pending
	s.pending = nil
	s.mu.Unlock()
	for _, o := range group {
		o.discard()
	}
	s.fs.Close()
}

func (s *digestStore) syncfs() error {
	s.mu.Lock()
	s.syncs++
	s.mu.Unlock()
	for {
		err := unix.Syncfs(int(s.fs.Fd()))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("syncing the digest store: %w", err)
		}
		return nil
	}
}

// checkObject verifies that the file at path has fs-verity digest d.
func checkObject(path string, d Digest) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	got, _, err := VerityDigestReader(f)
	if err != nil {
		return err
	}
	if got != d {
		return fmt.Errorf("%w: its digest is now %s, expected %s", ErrObjectChanged, got, d)
	}
	return nil
}

// ErrObjectChanged is wrapped when a file changed while it was being read.
var ErrObjectChanged = errors.New("file changed while it was stored")
