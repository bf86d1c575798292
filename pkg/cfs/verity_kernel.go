package cfs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrVerityUnsupported is wrapped by errors of the kernel fs-verity calls
// when the kernel or the filesystem cannot enable or measure fs-verity.
var ErrVerityUnsupported = errors.New("fs-verity not supported")

// ErrVerityNotEnabled is wrapped when a file's filesystem supports fs-verity
// but the file has none enabled.
var ErrVerityNotEnabled = errors.New("fs-verity not enabled on the file")

// isVerityUnsupported tells the errnos with which a kernel without
// CONFIG_FS_VERITY, or a filesystem without the feature, refuses the ioctls.
func isVerityUnsupported(err error) bool {
	return errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EOPNOTSUPP) ||
		errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL)
}

// EnableVerity enables fs-verity (SHA-256, 4096-byte blocks, no salt) on f,
// the digest composefs metacopy xattrs carry. f must be open read-only and no
// one may have the file open for writing. A file that has fs-verity already
// is left as it is. Where the kernel or filesystem cannot do it, the error
// wraps ErrVerityUnsupported.
func EnableVerity(f *os.File) error {
	arg := unix.FsverityEnableArg{
		Version:        1,
		Hash_algorithm: unix.FS_VERITY_HASH_ALG_SHA256,
		Block_size:     VerityBlockSize,
	}
	conn, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("enabling fs-verity on %s: %w", f.Name(), err)
	}
	var errno error
	if err := conn.Control(func(fd uintptr) {
		for {
			_, _, e := unix.Syscall(unix.SYS_IOCTL, fd, unix.FS_IOC_ENABLE_VERITY, uintptr(unsafe.Pointer(&arg)))
			if e == unix.EINTR {
				continue
			}
			if e != 0 {
				errno = e
			}
			return
		}
	}); err != nil {
		return fmt.Errorf("enabling fs-verity on %s: %w", f.Name(), err)
	}
	switch {
	case errno == nil, errors.Is(errno, unix.EEXIST):
		return nil
	case isVerityUnsupported(errno):
		return fmt.Errorf("enabling fs-verity on %s: %w by this kernel or filesystem (%v)", f.Name(), ErrVerityUnsupported, errno)
	case errors.Is(errno, unix.ETXTBSY):
		return fmt.Errorf("enabling fs-verity on %s: the file is open for writing: %w", f.Name(), errno)
	}
	return fmt.Errorf("enabling fs-verity on %s: %w", f.Name(), errno)
}

// MeasureVerity returns the fs-verity digest the kernel keeps for f. A file
// without fs-verity gives an error wrapping ErrVerityNotEnabled; a kernel or
// filesystem without fs-verity one wrapping ErrVerityUnsupported.
func MeasureVerity(f *os.File) (Digest, error) {
	// struct fsverity_digest { __u16 digest_algorithm; __u16 digest_size; __u8 digest[]; }
	var buf struct {
		alg    uint16
		size   uint16
		digest [64]byte
	}
	buf.size = uint16(len(buf.digest))
	conn, err := f.SyscallConn()
	if err != nil {
		return Digest{}, fmt.Errorf("measuring fs-verity of %s: %w", f.Name(), err)
	}
	var errno error
	if err := conn.Control(func(fd uintptr) {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, fd, unix.FS_IOC_MEASURE_VERITY, uintptr(unsafe.Pointer(&buf)))
		if e != 0 {
			errno = e
		}
	}); err != nil {
		return Digest{}, fmt.Errorf("measuring fs-verity of %s: %w", f.Name(), err)
	}
	switch {
	case errno == nil:
	case errors.Is(errno, unix.ENODATA):
		return Digest{}, fmt.Errorf("measuring fs-verity of %s: %w", f.Name(), ErrVerityNotEnabled)
	case isVerityUnsupported(errno):
		return Digest{}, fmt.Errorf("measuring fs-verity of %s: %w by this kernel or filesystem (%v)", f.Name(), ErrVerityUnsupported, errno)
	default:
		return Digest{}, fmt.Errorf("measuring fs-verity of %s: %w", f.Name(), errno)
	}
	if buf.alg != unix.FS_VERITY_HASH_ALG_SHA256 || buf.size != DigestSize {
		return Digest{}, fmt.Errorf("measuring fs-verity of %s: digest algorithm %d of %d bytes, want SHA-256 (1) of %d", f.Name(), buf.alg, buf.size, DigestSize)
	}
	var d Digest
	copy(d[:], buf.digest[:DigestSize])
	return d, nil
}

// VeritySupport probes whether fs-verity can be enabled and measured on files
// of the filesystem under dir. It enables fs-verity on an anonymous probe
// file there (nothing is left behind) and checks the kernel's digest against
// the userspace one. Where dir cannot be written (a read-only extra store),
// it measures an existing file instead: a filesystem that can measure
// fs-verity counts as supporting it. (false, nil) means "not supported"; an
// error means the probe itself could not be done.
func VeritySupport(dir string) (bool, error) {
	ok, err := probeVerityTmpfile(dir)
	if err == nil {
		return ok, nil
	}
	if !errors.Is(err, fs.ErrPermission) && !errors.Is(err, unix.EROFS) {
		return false, err
	}
	return probeVerityExisting(dir)
}

func probeVerityTmpfile(dir string) (bool, error) {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	var w *os.File
	if err == nil {
		w = os.NewFile(uintptr(fd), filepath.Join(dir, "(fs-verity probe)"))
	} else {
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EISDIR) {
			return false, fmt.Errorf("probing fs-verity under %s: creating a probe file: %w", dir, err)
		}
		// No O_TMPFILE on this filesystem: a named file, removed at once.
		w, err = os.CreateTemp(dir, ".verity-probe-")
		if err != nil {
			return false, fmt.Errorf("probing fs-verity under %s: %w", dir, err)
		}
		os.Remove(w.Name())
	}
	defer w.Close()
	probe := []byte("composefs fs-verity probe\n")
	if _, err := w.Write(probe); err != nil {
		return false, fmt.Errorf("probing fs-verity under %s: writing the probe file: %w", dir, err)
	}
	// fs-verity needs a read-only descriptor and no writer: reopen the
	// inode read-only through /proc, then drop the writable descriptor.
	r, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", w.Fd()))
	if err != nil {
		return false, fmt.Errorf("probing fs-verity under %s: reopening the probe file: %w", dir, err)
	}
	defer r.Close()
	if err := w.Close(); err != nil {
		return false, fmt.Errorf("probing fs-verity under %s: %w", dir, err)
	}
	if err := EnableVerity(r); err != nil {
		if errors.Is(err, ErrVerityUnsupported) {
			return false, nil
		}
		return false, fmt.Errorf("probing fs-verity under %s: %w", dir, err)
	}
	got, err := MeasureVerity(r)
	if err != nil {
		if errors.Is(err, ErrVerityUnsupported) {
			return false, nil
		}
		return false, fmt.Errorf("probing fs-verity under %s: %w", dir, err)
	}
	if want := VerityDigestOf(probe); got != want {
		return false, fmt.Errorf("probing fs-verity under %s: kernel digest %s differs from the userspace digest %s", dir, got, want)
	}
	return true, nil
}

// probeVerityExisting measures the first regular file found in dir or in
// one of its subdirectories (the xx/ fan-out of an object store).
func probeVerityExisting(dir string) (bool, error) {
	name, err := firstRegularFile(dir, 1)
	if err != nil {
		return false, fmt.Errorf("probing fs-verity under read-only %s: %w", dir, err)
	}
	if name == "" {
		return false, fmt.Errorf("probing fs-verity under read-only %s: no file to measure", dir)
	}
	f, err := os.Open(name)
	if err != nil {
		return false, fmt.Errorf("probing fs-verity under read-only %s: %w", dir, err)
	}
	defer f.Close()
	_, err = MeasureVerity(f)
	switch {
	case err == nil, errors.Is(err, ErrVerityNotEnabled):
		return true, nil
	case errors.Is(err, ErrVerityUnsupported):
		return false, nil
	}
	return false, fmt.Errorf("probing fs-verity under read-only %s: %w", dir, err)
}

func firstRegularFile(dir string, depth int) (string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	for _, e := range ents {
		if e.Type().IsRegular() {
			return filepath.Join(dir, e.Name()), nil
		}
	}
	if depth == 0 {
		return "", nil
	}
	for _, e := range ents {
		if e.IsDir() {
			if name, err := firstRegularFile(filepath.Join(dir, e.Name()), depth-1); err != nil || name != "" {
				return name, err
			}
		}
	}
	return "", nil
}
