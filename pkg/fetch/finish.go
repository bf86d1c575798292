package fetch

import (
	"errors"
	"fmt"
	"os"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

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
