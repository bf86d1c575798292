package fetch

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// tempFile is a download in progress: an anonymous O_TMPFILE inode where the
// filesystem has them (no directory entry is created or removed, and a
// killed process leaves nothing in tmp/), a named file under tmp/
// otherwise.
type tempFile struct {
	*os.File
	anon bool         // O_TMPFILE: published with linkat, never removed by name
	room *reservation // its room in the download budget, given back once it leaves tmp/
}

// noTmpfile is set once O_TMPFILE was refused by the store's filesystem.
var noTmpfile atomic.Bool

// createTemp creates a temporary file in dir (on the store's filesystem);
// pattern names the file when O_TMPFILE is not available or the store is
// told not to use it (Options.NamedTempFiles).
func (s *Store) createTemp(dir, pattern string) (*tempFile, error) {
	return createTemp(dir, pattern, s.opts.NamedTempFiles)
}

func createTemp(dir, pattern string, named bool) (*tempFile, error) {
	if !named && !noTmpfile.Load() {
		fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, objectMode)
		if err == nil {
			return &tempFile{File: os.NewFile(uintptr(fd), filepath.Join(dir, "(anonymous "+pattern+")")), anon: true}, nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EISDIR) {
			return nil, &os.PathError{Op: "open", Path: dir, Err: err}
		}
		noTmpfile.Store(true)
	}
	f, err := os.CreateTemp(dir, pattern)
	if err != nil {
		return nil, err
	}
	return &tempFile{File: f}, nil
}

// objectMode is the mode of stored files.
const objectMode = 0o644

// tmpfileKeepsMode reports whether an anonymous file created in dir with
// mode objectMode gets exactly that mode: what the process's umask and the
// directory's default ACL leave of it. Where they do, objects need no
// fchmod before they are published (Open asks once per store). False
// where dir has no O_TMPFILE or the probe fails.
func tmpfileKeepsMode(dir string) bool {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, objectMode)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return false
	}
	return st.Mode&0o7777 == objectMode
}

// discard closes and removes an unpublished temporary file.
func (t *tempFile) discard() {
	t.Close()
	if !t.anon {
		os.Remove(t.Name())
	}
	t.room.release()
}

// reopenReadOnly replaces the writable descriptor of an anonymous file by a
// read-only one (fs-verity needs no writer), keeping the inode alive.
func (t *tempFile) reopenReadOnly() error {
	ro, err := os.Open("/proc/self/fd/" + strconv.Itoa(int(t.Fd())))
	if err != nil {
		return err
	}
	if err := t.File.Close(); err != nil {
		ro.Close()
		return err
	}
	t.File = ro
	return nil
}

// publish gives the complete, verified and durable temporary file its final
// name (creating its directory when missing) and closes it (a named file
// was closed by prepareFile). An anonymous
// file is linked: when final exists, another writer stored the same
// content first, which is as good. A named file is renamed.
func (t *tempFile) publish(final string) error {
	err := t.place(final)
	if errors.Is(err, fs.ErrNotExist) { // first object of its xx/ directory
		if err = os.Mkdir(filepath.Dir(final), 0o755); err == nil || errors.Is(err, fs.ErrExist) {
			err = t.place(final)
		}
	}
	if err != nil {
		t.discard()
		return err
	}
	if t.anon {
		// Already durable (the group sync came first) and linked.
		_ = t.Close()
	}
	t.room.release()
	return nil
}

func (t *tempFile) place(final string) error {
	if !t.anon {
		return os.Rename(t.Name(), final)
	}
	err := unix.Linkat(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(int(t.Fd())), unix.AT_FDCWD, final, unix.AT_SYMLINK_FOLLOW)
	if errors.Is(err, unix.ENOENT) {
		if _, serr := os.Stat(filepath.Dir(final)); serr == nil {
			// The directory is there: no /proc; try the descriptor itself
			// (needs CAP_DAC_READ_SEARCH on older kernels).
			err = unix.Linkat(int(t.Fd()), "", unix.AT_FDCWD, final, unix.AT_EMPTY_PATH)
		}
	}
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	if err != nil {
		return &os.LinkError{Op: "link", Old: t.Name(), New: final, Err: err}
	}
	return nil
}
