package cfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// storeObject puts the content of src into dir/xx/yyyy… named by d, unless a
// regular file of the same size is there already. The object is written to a
// temporary file (reflinked, hardlinked when asked, or copied), checked
// against d, made 0644, fsynced and renamed into place, so the store never
// holds a partial or wrong object under a digest name.
func storeObject(ctx context.Context, dir string, d Digest, src *os.File, hardlink bool) error {
	st, err := src.Stat()
	if err != nil {
		return err
	}
	final := filepath.Join(dir, d.ObjectPath())
	if fi, err := os.Lstat(final); err == nil && fi.Mode().IsRegular() && fi.Size() == st.Size() {
		return nil
	}
	sub := filepath.Dir(final)
	if err := os.MkdirAll(sub, 0o755); err != nil {
		return fmt.Errorf("creating object directory: %w", err)
	}
	if hardlink {
		// A unique temporary name: workers storing the same digest at once
		// must not remove each other's link.
		tmpName := filepath.Join(dir, fmt.Sprintf(".tmp-link-%s-%d", d.String()[:16], rand.Uint64()))
		if err := os.Link(src.Name(), tmpName); err == nil {
			err := src.Sync() // the shared inode's data must be durable before it has its digest name
			if err == nil {
				err = checkObject(tmpName, d)
			}
			if err == nil {
				err = renameSynced(tmpName, final)
			}
			os.Remove(tmpName) // gone after a rename; left when both names were one inode
			return err
		}
		// Another filesystem, or links not allowed: copy instead.
	}
	tmp, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("creating temporary object: %w", err)
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := unix.IoctlFileClone(int(tmp.Fd()), int(src.Fd())); err != nil {
		if _, err := src.Seek(0, io.SeekStart); err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		// io.Copy between files uses copy_file_range where it can.
		if _, err := io.Copy(tmp, src); err != nil {
			return fmt.Errorf("copying object %s: %w", d, err)
		}
	}
	if err := tmp.Chmod(0o644); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("syncing object %s: %w", d, err)
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := checkObject(tmp.Name(), d); err != nil {
		return err
	}
	if err := renameSynced(tmp.Name(), final); err != nil {
		return err
	}
	done = true
	return nil
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

// ErrObjectChanged is wrapped when a file changed while it was being stored.
var ErrObjectChanged = errors.New("file changed while it was stored")

// renameSynced renames from to to and fsyncs the target directory.
func renameSynced(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return fmt.Errorf("renaming object into place: %w", err)
	}
	d, err := os.Open(filepath.Dir(to))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
