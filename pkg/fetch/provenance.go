package fetch

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// Provenance: which principals have shown the node that they hold a stored
// file.
//
// A principal is what a request speaks for: a source (its canonical URL)
// together with the credentials it presents (the driver passes both, hashed,
// as ForPrincipal). Content in the node-wide store was delivered by one
// principal; it serves another principal's volume only after that
// principal's source has shown that it holds it (see proof.go), because
// knowing a digest is not being allowed to read the content.
//
// Who showed what is kept on the stored file itself, as a small user.*
// extended attribute listing principal ids:
//
//   - its lifecycle is the file's: GC, quarantine and re-downloads need no
//     bookkeeping, and nothing else grows with the store;
//   - it is bounded: at most maxShown ids of 8 bytes (48 bytes with the
//     name fit in the in-inode xattr space of an ext4 inode of 256 bytes,
//     so it costs no disk block); a principal beyond that pushes out the
//     oldest, which then proves possession again when it needs the file;
//   - it is crash-safe in the safe direction: one setxattr replaces the
//     whole value, and an attribute lost or damaged (a crash, a copy, a
//     filesystem without user xattrs) only lists fewer principals, which
//     costs extra proofs and never grants access. Nothing is fsynced.
//
// Ids are an HMAC of the principal under a random key kept in the store
// (provenanceKeyFile), so they reveal nothing about the credentials and a
// principal cannot be forged from outside the node. A filesystem that
// refuses user xattrs falls back to a bounded in-memory set (lost at
// restart: every principal then proves again once).
const (
	shownXattr        = "user.cfs.shown"
	principalIDSize   = 8
	maxShown          = 6
	provenanceKeyFile = "provenance.key"
	// maxShownInMemory bounds the fallback set (about 5 MB); it is cleared
	// when full.
	maxShownInMemory = 1 << 16
)

type principalID [principalIDSize]byte

// ForPrincipal makes an Ensure call act for principal (the canonical
// source URL and a fingerprint of the credentials, in any stable encoding):
// content the store already has serves the call only once the source has
// shown that it holds it, and what the source delivers or shows is recorded
// for the principal. Without it, stored content is used as is (a single
// user's store: the pull command, or --trust-shared-content).
func ForPrincipal(principal string) EnsureOption {
	return func(c *ensureConfig) { c.principal, c.hasPrincipal = principal, true }
}

type provenance struct {
	keyOnce sync.Once
	key     []byte

	noXattr atomic.Bool // the filesystem refused user xattrs

	mu  sync.Mutex // serialises read-modify-write of the attribute, guards mem
	mem map[shownKey]struct{}
}

// shownKey names what was shown: provenance is about content, so it is
// keyed by digest, not by file (a re-downloaded file has the same bytes).
type shownKey struct {
	d     cfs.Digest
	image bool
	p     principalID
}

func (s *Store) shownPath(k shownKey) string {
	if k.image {
		return s.ImagePath(k.d)
	}
	return s.objectPath(k.d)
}

// provenanceKey returns the store's HMAC key (loaded or created by Open).
// When it cannot be read or written (a read-only store), a key for this
// process is used: provenance then does not survive a restart.
func (s *Store) provenanceKey(ctx context.Context) []byte {
	pv := &s.prov
	pv.keyOnce.Do(func() {
		path := filepath.Join(s.root, provenanceKeyFile)
		key, err := os.ReadFile(path)
		if err == nil && len(key) == sha256.Size {
			pv.key = key
			return
		}
		if err == nil || errors.Is(err, fs.ErrNotExist) {
			key, err = writeNewKey(path)
			if err == nil {
				pv.key = key
				return
			}
		}
		pv.key = make([]byte, sha256.Size)
		_, _ = rand.Read(pv.key)
		klog.FromContext(ctx).Error(err, "Provenance key unavailable; using a key for this process only (every principal proves possession again after a restart)", "path", path)
	})
	return pv.key
}

func writeNewKey(path string) ([]byte, error) {
	key := make([]byte, sha256.Size)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	_, err = f.Write(key)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	// Losing the key in a crash only means a new one: every principal
	// proves possession again.
	_ = syncDir(filepath.Dir(path))
	return key, nil
}

// principalID derives the id recorded for principal.
func (s *Store) principalID(ctx context.Context, principal string) principalID {
	m := hmac.New(sha256.New, s.provenanceKey(ctx))
	m.Write([]byte("principal\x00"))
	m.Write([]byte(principal))
	var id principalID
	copy(id[:], m.Sum(nil))
	return id
}

// readShown returns the ids recorded on path; anything unreadable counts
// as none.
func readShown(path string) ([]principalID, error) {
	var buf [maxShown*principalIDSize + 1]byte
	n, err := unix.Getxattr(path, shownXattr, buf[:])
	if err != nil {
		if errors.Is(err, unix.ENODATA) || errors.Is(err, unix.ERANGE) {
			return nil, nil // none, or not ours (too long): none
		}
		return nil, err
	}
	return parseShown(buf[:n]), nil
}

// parseShown decodes an attribute value: whole ids only, at most maxShown.
func parseShown(b []byte) []principalID {
	if len(b)%principalIDSize != 0 || len(b) > maxShown*principalIDSize {
		return nil
	}
	ids := make([]principalID, len(b)/principalIDSize)
	for i := range ids {
		copy(ids[i][:], b[i*principalIDSize:])
	}
	return ids
}

func encodeShown(ids []principalID) []byte {
	b := make([]byte, 0, len(ids)*principalIDSize)
	for _, id := range ids {
		b = append(b, id[:]...)
	}
	return b
}

func hasID(ids []principalID, p principalID) bool {
	for _, id := range ids {
		if id == p {
			return true
		}
	}
	return false
}

func xattrUnsupported(err error) bool {
	return errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EOPNOTSUPP)
}

// isShown reports whether k.p has shown that it holds k's content.
func (s *Store) isShown(k shownKey) bool {
	pv := &s.prov
	pv.mu.Lock()
	_, ok := pv.mem[k]
	pv.mu.Unlock()
	if ok {
		return true
	}
	if pv.noXattr.Load() {
		return false
	}
	ids, err := readShown(s.shownPath(k))
	if err != nil {
		if xattrUnsupported(err) {
			pv.noXattr.Store(true)
		}
		return false
	}
	return hasID(ids, k.p)
}

// noteShown records k in memory only, until markShown persists it: for
// an object about to get its name, so that no call finds it stored before
// its provenance is known.
func (s *Store) noteShown(k shownKey) {
	pv := &s.prov
	pv.mu.Lock()
	defer pv.mu.Unlock()
	pv.remember(k)
}

// remember keeps k in memory, bounded. The caller holds mu.
func (pv *provenance) remember(k shownKey) {
	if pv.mem == nil || len(pv.mem) >= maxShownInMemory {
		pv.mem = make(map[shownKey]struct{})
	}
	pv.mem[k] = struct{}{}
}

// markShown records that k.p showed it holds k's content. Failing to
// record only costs a proof later.
func (s *Store) markShown(ctx context.Context, k shownKey) {
	pv := &s.prov
	pv.mu.Lock()
	defer pv.mu.Unlock()
	if !pv.noXattr.Load() {
		path := s.shownPath(k)
		err := addShown(path, k.p)
		if err == nil {
			delete(pv.mem, k) // on disk now (noteShown's copy is not needed)
			return
		}
		if xattrUnsupported(err) {
			pv.noXattr.Store(true)
			klog.FromContext(ctx).Info("The store's filesystem refuses user extended attributes: provenance is kept in memory only (principals prove possession again after a restart)", "store", s.root)
		} else {
			klog.FromContext(ctx).V(2).Info("Recording provenance failed; keeping it in memory", "path", path, "err", err)
		}
	}
	pv.remember(k)
}

// addShown adds p to the attribute of path, pushing out the oldest ids
// beyond maxShown. The caller holds prov.mu.
func addShown(path string, p principalID) error {
	ids, err := readShown(path)
	if err != nil {
		return err
	}
	if hasID(ids, p) {
		return nil
	}
	ids = append(ids, p)
	if len(ids) > maxShown {
		ids = ids[len(ids)-maxShown:]
	}
	return unix.Setxattr(path, shownXattr, encodeShown(ids), 0)
}

// carryShown copies the ids recorded on from (if any) to to, which is
// about to replace it (a re-downloaded image).
func (s *Store) carryShown(from, to string) {
	if s.prov.noXattr.Load() {
		return
	}
	s.prov.mu.Lock()
	defer s.prov.mu.Unlock()
	ids, err := readShown(from)
	if err != nil || len(ids) == 0 {
		return
	}
	_ = unix.Setxattr(to, shownXattr, encodeShown(ids), 0)
}

// ImageShown reports whether principal has shown (by serving it) that it
// holds the stored image d.
func (s *Store) ImageShown(ctx context.Context, d cfs.Digest, principal string) bool {
	return s.isShown(shownKey{d: d, image: true, p: s.principalID(ctx, principal)})
}
