package fetch

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// fileInfo is what locate needs of a stored file: lstat, plus whether the
// file has fs-verity (statx's STATX_ATTR_VERITY, no extra syscall).
type fileInfo struct {
	size    int64
	regular bool
	verity  bool // known to have fs-verity enabled
}

func lstatVerity(path string) (fileInfo, error) {
	var st unix.Statx_t
	err := ignoringEINTR(func() error {
		return unix.Statx(unix.AT_FDCWD, path, unix.AT_SYMLINK_NOFOLLOW|unix.AT_STATX_SYNC_AS_STAT,
			unix.STATX_TYPE|unix.STATX_SIZE, &st)
	})
	if err != nil {
		return fileInfo{}, &fs.PathError{Op: "statx", Path: path, Err: err}
	}
	return fileInfo{
		size:    int64(st.Size),
		regular: st.Mode&unix.S_IFMT == unix.S_IFREG,
		verity:  st.Attributes_mask&unix.STATX_ATTR_VERITY != 0 && st.Attributes&unix.STATX_ATTR_VERITY != 0,
	}, nil
}

// addVerity enables fs-verity on a stored file that has none (stored while
// the store had fs-verity off, or by an older version) and checks that the
// kernel's digest is the file's name, want. It returns false when the
// content is not want: the file is then quarantined (the caller treats it
// as missing).
func (s *Store) addVerity(ctx context.Context, path string, want cfs.Digest) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("enabling fs-verity on stored %s: %w", path, err)
	}
	err = s.enableVerity(f, want)
	f.Close()
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, ErrDigestMismatch):
		if _, qerr := s.quarantine(ctx, path, err.Error()); qerr != nil {
			return false, qerr
		}
		return false, nil
	}
	return false, fmt.Errorf("enabling fs-verity on stored %s: %w", path, err)
}

// storedImageVerity enables fs-verity on a stored image that has none
// where the store has it (the mount's verity=require measures the image);
// an image whose content is not its name is quarantined, and the caller
// then finds it missing and fetches it again.
func (s *Store) storedImageVerity(ctx context.Context, d cfs.Digest) error {
	if !s.verity.Load() {
		return nil
	}
	path := s.ImagePath(d)
	fi, err := lstatVerity(path)
	if err != nil || fi.verity || !fi.regular {
		return nil // gone meanwhile, or for the caller's checks to find
	}
	_, err = s.addVerity(ctx, path, d)
	return err
}
