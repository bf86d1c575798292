package fetch

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// Kept signatures: the signature material that verified a stored image,
// kept beside it so that the verdict survives a restart.
//
// What is kept is the signature itself, not a verdict ("verified by key
// K"): a verdict is a claim anyone who can write the store could forge,
// while a signature cannot be made without the private key. The driver
// verifies kept signatures again, offline, against the trust policy in
// force when the image is used: a key since removed from the policy no
// longer counts, a rule that stopped requiring signatures does not ask.
//
// One file per image, signatures/<digest>.json, replaced atomically and
// durably (written in tmp/, synced, renamed, the directory synced), removed
// with its image by GC (and swept when its image is gone). It is bounded:
// at most maxKeptSignatures entries and maxKeptBytes in all (the oldest go
// first); a file over the bound, or one that does not parse, counts as no
// signature (the image is then verified again from its source).
const (
	signaturesDir     = "signatures"
	keptSuffix        = ".json"
	maxKeptSignatures = 4
	maxKeptBytes      = 256 << 10
)

// KeptSignature is signature material kept for a stored image: either
// Blob (a cosign sign-blob signature or bundle over the image file), or
// Manifest with Payload and Signature (cosign's simple signing layer) or
// Bundle (a sigstore bundle referrer) — the signature of the registry
// manifest the image was fetched by. ManifestBytes, for a composefs
// artifact, is that manifest (or index) itself: its digest is Manifest
// and its annotation names the image, so the link from the signed
// manifest to the stored image can be checked offline.
type KeptSignature struct {
	Blob          []byte `json:"blob,omitempty"`
	Manifest      string `json:"manifest,omitempty"`
	ManifestBytes []byte `json:"manifestBytes,omitempty"`
	Payload       []byte `json:"payload,omitempty"`
	Signature     string `json:"signature,omitempty"`
	Bundle        []byte `json:"bundle,omitempty"`
}

func (k KeptSignature) size() int {
	return len(k.Blob) + len(k.Manifest) + len(k.ManifestBytes) + len(k.Payload) + len(k.Signature) + len(k.Bundle)
}

func (k KeptSignature) equal(o KeptSignature) bool {
	return bytes.Equal(k.Blob, o.Blob) && k.Manifest == o.Manifest && bytes.Equal(k.ManifestBytes, o.ManifestBytes) &&
		bytes.Equal(k.Payload, o.Payload) && k.Signature == o.Signature && bytes.Equal(k.Bundle, o.Bundle)
}

type keptFile struct {
	Version    int             `json:"version"`
	Signatures []KeptSignature `json:"signatures"`
}

const keptVersion = 1

func (s *Store) keptPath(d cfs.Digest) string {
	return filepath.Join(s.root, signaturesDir, d.String()+keptSuffix)
}

// KeptSignatures returns the signatures kept for the stored image d, oldest
// first. None (and no error) when none are kept or the file is not one this
// store wrote.
func (s *Store) KeptSignatures(ctx context.Context, d cfs.Digest) ([]KeptSignature, error) {
	f, err := os.OpenFile(s.keptPath(d), os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if errors.Is(err, unix.ELOOP) {
		klog.FromContext(ctx).Info("Ignoring kept signatures", "image", d.String(), "path", s.keptPath(d), "reason", "a symbolic link")
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the kept signatures of image %s: %w", d, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 2*maxKeptBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading the kept signatures of image %s: %w", d, err)
	}
	sigs, err := parseKept(b)
	if err != nil {
		klog.FromContext(ctx).Info("Ignoring kept signatures", "image", d.String(), "path", f.Name(), "reason", err.Error())
		return nil, nil
	}
	return sigs, nil
}

// parseKept decodes a kept-signatures file; anything out of bounds is an
// error.
func parseKept(b []byte) ([]KeptSignature, error) {
	if len(b) > 2*maxKeptBytes {
		return nil, fmt.Errorf("more than %d bytes", 2*maxKeptBytes)
	}
	var kf keptFile
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&kf); err != nil {
		return nil, fmt.Errorf("not a kept-signatures file: %w", err)
	}
	if dec.More() {
		return nil, errors.New("not a kept-signatures file: data after the JSON object")
	}
	if kf.Version != keptVersion {
		return nil, fmt.Errorf("version %d, want %d", kf.Version, keptVersion)
	}
	if len(kf.Signatures) > maxKeptSignatures {
		return nil, fmt.Errorf("%d signatures, more than %d", len(kf.Signatures), maxKeptSignatures)
	}
	total := 0
	for _, k := range kf.Signatures {
		total += k.size()
	}
	if total > maxKeptBytes {
		return nil, fmt.Errorf("%d bytes of signatures, more than %d", total, maxKeptBytes)
	}
	return kf.Signatures, nil
}

// KeepSignature keeps sig for the stored image d (beside the ones kept
// already; an equal one is not kept twice), durably before it returns.
// Material larger than the bound is not kept (an error saying so): the
// image is then verified from its source after a restart.
func (s *Store) KeepSignature(ctx context.Context, d cfs.Digest, sig KeptSignature) error {
	if sig.size() == 0 {
		return errors.New("keeping a signature: it is empty")
	}
	if sig.size() > maxKeptBytes {
		return fmt.Errorf("keeping a signature of image %s: %d bytes, more than the %d kept per image", d, sig.size(), maxKeptBytes)
	}
	s.keptMu.Lock()
	defer s.keptMu.Unlock()
	if !s.HasImage(d) {
		return fmt.Errorf("keeping a signature of image %s: %w", d, ErrNotFound)
	}
	old, err := s.KeptSignatures(ctx, d)
	if err != nil {
		return err
	}
	sigs := []KeptSignature{sig}
	total := sig.size()
	// Newest first while bounding, then oldest first in the file.
	for i := len(old) - 1; i >= 0 && len(sigs) < maxKeptSignatures; i-- {
		if old[i].equal(sig) {
			if i == len(old)-1 {
				return nil // kept already, and newest
			}
			continue
		}
		if total+old[i].size() > maxKeptBytes {
			break
		}
		total += old[i].size()
		sigs = append(sigs, old[i])
	}
	for i, j := 0, len(sigs)-1; i < j; i, j = i+1, j-1 {
		sigs[i], sigs[j] = sigs[j], sigs[i]
	}
	b, err := json.Marshal(keptFile{Version: keptVersion, Signatures: sigs})
	if err != nil {
		return fmt.Errorf("keeping a signature of image %s: %w", d, err)
	}
	if err := s.writeKept(d, b); err != nil {
		return fmt.Errorf("keeping a signature of image %s: %w", d, err)
	}
	return nil
}

// writeKept replaces the kept-signatures file of d with b: written in
// tmp/ (cleared at Open), synced, renamed into place, the directory
// synced.
func (s *Store) writeKept(d cfs.Digest, b []byte) error {
	dir := filepath.Join(s.root, signaturesDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Join(s.root, tmpDir), "signatures-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = s.fsync(f)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, s.keptPath(d))
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return s.syncDir(dir)
}

// keptAllocated returns the bytes the signatures kept for d occupy on
// disk (0 when none are kept).
func (s *Store) keptAllocated(d cfs.Digest) int64 {
	fi, err := os.Lstat(s.keptPath(d))
	if err != nil || !fi.Mode().IsRegular() {
		return 0
	}
	return allocated(fi)
}

// removeKept removes the signatures kept for d if its image is gone.
func (s *Store) removeKept(d cfs.Digest) error {
	s.keptMu.Lock()
	defer s.keptMu.Unlock()
	if s.hasImageFile(d) {
		return nil // stored again meanwhile
	}
	if err := os.Remove(s.keptPath(d)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// sweepKept removes the kept-signature files whose image is no longer
// stored (and files not named like kept signatures). It returns the
// bytes it freed.
func (s *Store) sweepKept(ctx context.Context) (int64, error) {
	dir := filepath.Join(s.root, signaturesDir)
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("GC: listing %s: %w", dir, err)
	}
	var n int64
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return n, err
		}
		d, err := cfs.ParseDigest(strings.TrimSuffix(e.Name(), keptSuffix))
		s.keptMu.Lock()
		gone := err != nil || !strings.HasSuffix(e.Name(), keptSuffix) || !s.hasImageFile(d)
		if gone {
			var size int64
			if fi, err := e.Info(); err == nil && fi.Mode().IsRegular() {
				size = allocated(fi)
			}
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				s.keptMu.Unlock()
				return n, fmt.Errorf("GC: removing %s: %w", e.Name(), err)
			}
			n += size
		}
		s.keptMu.Unlock()
	}
	return n, nil
}
