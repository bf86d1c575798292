package fetch

import (
	"errors"
	"fmt"
	"os"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// finishFile makes a complete, verified temporary file whose content has
// digest want ready to be renamed into the store: mode 0644, fsynced,
// closed, fs-verity enabled (and measured equal to want) where the
// filesystem supports it. f is closed.
func (s *Store) finishFile(f *os.File, want cfs.Digest) error { return s.prepareFile(f, want, true) }

// prepareFile makes a complete, verified temporary file ready to be
// renamed into the store: mode 0644, fsynced when sync is set (otherwise
// the caller makes it durable), closed, fs-verity enabled where the
// filesystem supports it. f is closed.
func (s *Store) prepareFile(f *os.File, want cfs.Digest, sync bool) error {
	if err := f.Chmod(objectMode); err != nil {
		return fmt.Errorf("finishing %s: %w", f.Name(), err)
	}
	if sync {
		if err := s.fsync(f); err != nil {
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
	return s.enableVerity(ro, want)
}

// prepareTemp makes a complete, verified temporary object file whose
// content has digest want ready to be published once the group sync has
// made it durable: mode 0644, fs-verity enabled (and measured equal to
// want) where the filesystem supports it. It stays open (an anonymous file
// lives only as long as a descriptor on it). An anonymous file was created
// with mode 0644, and needs no fchmod where the store found at Open that
// its files keep that mode (anonModeSet).
func (s *Store) prepareTemp(t *tempFile, want cfs.Digest) error {
	if !t.anon {
		return s.prepareFile(t.File, want, false)
	}
	if !s.anonModeSet {
		if err := t.Chmod(objectMode); err != nil {
			return fmt.Errorf("finishing %s: %w", t.Name(), err)
		}
	}
	if !s.verity.Load() {
		return nil
	}
	if err := t.reopenReadOnly(); err != nil {
		return fmt.Errorf("enabling fs-verity: %w", err)
	}
	return s.enableVerity(t.File, want)
}

// enableVerity enables fs-verity on f (open read-only, no writer) and
// checks that the digest the kernel measures is want: the name the file
// gets. From then on the kernel checks every page read from the file
// against that digest. A filesystem that turns out not to support it turns
// fs-verity off for the store (the file is then used as it is).
func (s *Store) enableVerity(f *os.File, want cfs.Digest) error {
	if err := cfs.EnableVerity(f); err != nil {
		if errors.Is(err, cfs.ErrVerityUnsupported) {
			s.verity.Store(false)
			return nil
		}
		return err
	}
	got, err := cfs.MeasureVerity(f)
	if err != nil {
		return err
	}
	if got != want {
		return fmt.Errorf("%s: the kernel measures fs-verity digest %s, want %s: %w", f.Name(), got, want, ErrDigestMismatch)
	}
	return nil
}
