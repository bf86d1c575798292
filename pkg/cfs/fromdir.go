package cfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// DirOptions control building a tree from a directory, as mkcomposefs does.
type DirOptions struct {
	// DigestStore, when set, receives a copy of every external file at
	// DigestStore/xx/yyyy… (its fs-verity digest), like --digest-store.
	DigestStore string
	// HardlinkObjects hardlinks source files into DigestStore instead of
	// copying them when both are on one filesystem. The store then shares the
	// source's inode, with its mode and owner: only use it when the source
	// will not be modified, or the store object changes with it.
	HardlinkObjects bool
	UseEpoch        bool // all mtimes 0 (--use-epoch)
	SkipDevices     bool // leave out block and character devices (--skip-devices)
	SkipXattrs      bool // read no xattrs (--skip-xattrs)
	UserXattrs      bool // read only user.* xattrs (--user-xattrs)
	// Threads hashing and copying files in parallel; 0 means one per CPU.
	// The output does not depend on it.
	Threads int
}

// BuildFromDir reads the directory src into a tree the way mkcomposefs does:
// metadata from lstat (hardlinks are not detected; non-directories get nlink
// 1), all xattrs, files of 1..64 bytes inlined, larger files named by their
// fs-verity digest and, with DigestStore, copied into the store.
func BuildFromDir(ctx context.Context, src string, opts DirOptions) (*Node, error) {
	b := dirBuilder{opts: opts}
	root, err := b.node(src, "")
	if err != nil {
		return nil, err
	}
	if !root.IsDir() {
		return nil, fmt.Errorf("building image from %s: not a directory", src)
	}
	if err := b.walk(ctx, src, root); err != nil {
		return nil, err
	}
	if opts.DigestStore != "" {
		s, err := openDigestStore(opts.DigestStore, opts.HardlinkObjects)
		if err != nil {
			return nil, err
		}
		b.store = s
	}
	if err := b.hashFiles(ctx); err != nil {
		if b.store != nil {
			b.store.abort()
		}
		return nil, err
	}
	if b.store != nil {
		if err := b.store.finish(ctx); err != nil {
			return nil, err
		}
	}
	return root, nil
}

type dirBuilder struct {
	opts     DirOptions
	files    []fileJob    // external-file candidates, hashed after the walk
	store    *digestStore // DigestStore, or nil
	xattrBuf []byte       // for listing xattr names
}

type fileJob struct {
	path     string
	node     *Node
	dev, ino uint64 // from the walk's lstat: the file hashed must be this one
}

func (b *dirBuilder) walk(ctx context.Context, dir string, parent *Node) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	// O_NOFOLLOW: a directory swapped for a symlink since its lstat must
	// not take the walk outside the source tree.
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("reading directory %s: %w", dir, err)
	}
	df := os.NewFile(uintptr(fd), dir)
	entries, err := df.ReadDir(-1)
	df.Close()
	if err != nil {
		return fmt.Errorf("reading directory %s: %w", dir, err)
	}
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		n, err := b.node(p, e.Name())
		if err != nil {
			return err
		}
		if n == nil {
			continue
		}
		if err := parent.AddChild(n); err != nil {
			return fmt.Errorf("adding %s: %w", p, err)
		}
		if n.IsDir() {
			if err := b.walk(ctx, p, n); err != nil {
				return err
			}
		}
	}
	return nil
}

// node makes the node for path (nil when options skip it).
func (b *dirBuilder) node(path, name string) (*Node, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return nil, fmt.Errorf("lstat %s: %w", path, err)
	}
	n := &Node{
		Name: name, Mode: st.Mode & 0o177777, Nlink: 1, UID: st.Uid, GID: st.Gid,
		Mtime: Timespec{Sec: st.Mtim.Sec, Nsec: uint32(st.Mtim.Nsec)},
	}
	if b.opts.UseEpoch {
		n.Mtime = Timespec{}
	}
	switch n.Type() {
	case ModeChar, ModeBlock:
		if b.opts.SkipDevices {
			return nil, nil
		}
		n.Rdev = st.Rdev
	case ModeSymlink:
		target, err := os.Readlink(path)
		if err != nil {
			return nil, fmt.Errorf("readlink %s: %w", path, err)
		}
		if len(target) == 0 || len(target) > MaxSymlinkLen {
			return nil, fmt.Errorf("symlink %s: target must be 1..%d bytes", path, MaxSymlinkLen)
		}
		n.Payload = target
		n.Size = uint64(len(target))
	case ModeRegular:
		n.Size = uint64(st.Size)
		if st.Size > 0 {
			b.files = append(b.files, fileJob{path: path, node: n, dev: st.Dev, ino: st.Ino})
		}
	case ModeDir, ModeFIFO, ModeSocket:
	default:
		return nil, fmt.Errorf("%s: unsupported file type %o", path, n.Type())
	}
	if err := b.readXattrs(path, n); err != nil {
		return nil, err
	}
	return n, nil
}

func (b *dirBuilder) readXattrs(path string, n *Node) error {
	if b.opts.SkipXattrs {
		return nil
	}
	names, err := b.listXattrs(path)
	if err != nil {
		return fmt.Errorf("listing xattrs of %s: %w", path, err)
	}
	sort.Strings(names)
	for _, key := range names {
		if b.opts.UserXattrs && !strings.HasPrefix(key, "user.") {
			continue
		}
		value, err := getXattr(path, key)
		if errors.Is(err, unix.ENODATA) {
			continue // removed since the listing
		}
		if err != nil {
			return fmt.Errorf("reading xattr %s of %s: %w", key, path, err)
		}
		if err := setXattrChecked(n, key, value); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
	}
	return nil
}

// listXattrs lists the xattr names of path, reading them into a buffer the
// walk reuses (most files have none).
func (b *dirBuilder) listXattrs(path string) ([]string, error) {
	if len(b.xattrBuf) == 0 {
		b.xattrBuf = make([]byte, 4096)
	}
	for {
		buf := b.xattrBuf
		n, err := unix.Llistxattr(path, buf)
		if errors.Is(err, unix.ERANGE) {
			size, err := unix.Llistxattr(path, nil)
			if err != nil {
				return nil, err
			}
			b.xattrBuf = make([]byte, size+1024)
			continue
		}
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return nil, nil
		}
		var names []string
		for _, s := range strings.Split(string(buf[:n]), "\x00") {
			if s != "" {
				names = append(names, s)
			}
		}
		return names, nil
	}
}

func getXattr(path, key string) ([]byte, error) {
	size := 256
	for {
		buf := make([]byte, size)
		n, err := unix.Lgetxattr(path, key, buf)
		if errors.Is(err, unix.ERANGE) {
			if size, err = unix.Lgetxattr(path, key, nil); err != nil {
				return nil, err
			}
			size += 256
			continue
		}
		if err != nil {
			return nil, err
		}
		return buf[:n], nil
	}
}

// hashFiles inlines small files and hashes (and stores) the others, in
// parallel; each result lands in its own node, so order does not matter.
func (b *dirBuilder) hashFiles(ctx context.Context) error {
	threads := b.opts.Threads
	if threads <= 0 {
		threads = runtime.GOMAXPROCS(0)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	jobs := make(chan fileJob)
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	for range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := newHashWorker()
			for j := range jobs {
				if err := b.hashFile(ctx, w, j); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
						cancel()
					}
					mu.Unlock()
				}
			}
		}()
	}
	for _, j := range b.files {
		if ctx.Err() != nil {
			break
		}
		jobs <- j
	}
	close(jobs)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

// hashWorker is one hashing goroutine's reusable state.
type hashWorker struct {
	h   *VerityHash
	buf []byte // read buffer; a whole file that fits is hashed and stored from it
}

// hashWorkerBuffer is the read buffer of a hashWorker: files up to this size
// are read whole, hashed, and written to the store only if it lacks them.
const hashWorkerBuffer = 1 << 20

func newHashWorker() *hashWorker {
	return &hashWorker{h: NewVerityHash(), buf: make([]byte, hashWorkerBuffer)}
}

func (b *dirBuilder) hashFile(ctx context.Context, w *hashWorker, j fileJob) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	// O_NOFOLLOW and O_NONBLOCK: a file replaced by a symlink or a FIFO
	// since the walk must be refused, not followed or waited on.
	fd, err := unix.Open(j.path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", j.path, err)
	}
	f := os.NewFile(uintptr(fd), j.path)
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat %s: %w", j.path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Dev != j.dev || st.Ino != j.ino {
		return fmt.Errorf("%s changed while building: it is no longer the regular file that was listed", j.path)
	}
	size := int64(j.node.Size)
	if j.node.Size <= DirInlineContentMax {
		content := make([]byte, size+1)
		n, err := io.ReadFull(f, content)
		if err != io.ErrUnexpectedEOF && err != nil {
			return fmt.Errorf("reading %s: %w", j.path, err)
		}
		if int64(n) != size {
			return fmt.Errorf("%s changed size while building (%d, now at least %d bytes)", j.path, size, n)
		}
		j.node.Content = content[:n:n]
		return nil
	}
	s := b.store
	w.h.Reset()
	if size < int64(len(w.buf)) {
		// Small enough to read whole: hash it, then store it from memory
		// if the store lacks it.
		n, err := io.ReadFull(f, w.buf[:size+1])
		if err != io.ErrUnexpectedEOF && err != nil {
			return fmt.Errorf("reading %s: %w", j.path, err)
		}
		if int64(n) != size {
			return fmt.Errorf("%s changed size while building (%d, now at least %d bytes)", j.path, size, n)
		}
		w.h.Write(w.buf[:n])
		d := b.setDigest(j, w)
		if s == nil || !s.claim(d, size) {
			return nil
		}
		if b.linkable(&st) {
			err, f = s.addLink(ctx, d, f, size), nil
		} else {
			err = b.storeBytes(ctx, d, w.buf[:n])
		}
		if err != nil {
			return fmt.Errorf("storing %s: %w", j.path, err)
		}
		return nil
	}
	// A large file: written to a new object while it is hashed (read once),
	// dropped if the store has it already.
	var o *pendingObject
	if s != nil && !b.linkable(&st) {
		if o, err = s.create(); err != nil {
			return err
		}
	}
	n, err := b.copyHashing(ctx, w, f, o)
	if err == nil && n != size {
		err = fmt.Errorf("%s changed size while building (%d, now %d bytes)", j.path, size, n)
	}
	if err != nil {
		if o != nil {
			o.discard()
		}
		return fmt.Errorf("reading %s: %w", j.path, err)
	}
	d := b.setDigest(j, w)
	switch {
	case s == nil:
		return nil
	case !s.claim(d, size):
		if o != nil {
			o.discard()
		}
		return nil
	case o == nil:
		err, f = s.addLink(ctx, d, f, size), nil
	default:
		err = s.add(ctx, d, o, size)
	}
	if err != nil {
		return fmt.Errorf("storing %s: %w", j.path, err)
	}
	return nil
}

// linkable tells whether HardlinkObjects can link the source file into the
// store (the same filesystem).
func (b *dirBuilder) linkable(st *unix.Stat_t) bool {
	return b.store != nil && b.store.hardlink && st.Dev == b.store.dev
}

func (b *dirBuilder) setDigest(j fileJob, w *hashWorker) Digest {
	d := w.h.Digest()
	j.node.Digest = &d
	j.node.Payload = d.ObjectPath()
	return d
}

// copyHashing reads f to its end through the hasher and, when o is set,
// into o, starting o's writeback as it goes.
func (b *dirBuilder) copyHashing(ctx context.Context, w *hashWorker, f *os.File, o *pendingObject) (int64, error) {
	var total, started int64
	for {
		n, err := f.Read(w.buf)
		if n > 0 {
			w.h.Write(w.buf[:n])
			if o != nil {
				if _, werr := o.f.Write(w.buf[:n]); werr != nil {
					return total, fmt.Errorf("writing the object: %w", werr)
				}
			}
			total += int64(n)
			if o != nil && total-started >= 8<<20 {
				_ = unix.SyncFileRange(int(o.f.Fd()), started, total-started, unix.SYNC_FILE_RANGE_WRITE)
				started = total
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		if err := ctx.Err(); err != nil {
			return total, err
		}
	}
}

// storeBytes writes a new object from memory.
func (b *dirBuilder) storeBytes(ctx context.Context, d Digest, data []byte) error {
	o, err := b.store.create()
	if err != nil {
		return err
	}
	if _, err := o.f.Write(data); err != nil {
		o.discard()
		return fmt.Errorf("writing object %s: %w", d, err)
	}
	return b.store.add(ctx, d, o, int64(len(data)))
}
