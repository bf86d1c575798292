package pack

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// The pack index of an image in an HTTP repository (README, "HTTP
// repository"): the image it is for, the packs (by sha256 and size) and
// the object index of the image's packed objects:
//
//	magic    "CFSPKIX1"
//	digest   32 bytes: the image's fs-verity digest
//	uvarint  number of packs
//	packs    32-byte sha256, uvarint size
//	index    the object index (see Index), whose pack numbers count in
//	         the list above, to the end
const repoIndexMagic = "CFSPKIX1"

// PackRef names one pack of a repository: REPO/packs/<sha256 hex>.tar.
type PackRef struct {
	SHA256 [sha256.Size]byte
	Size   int64
}

// Name is the pack's file name in REPO/packs/.
func (p PackRef) Name() string { return hex.EncodeToString(p.SHA256[:]) + ".tar" }

// RepoIndex is a decoded pack index.
type RepoIndex struct {
	Image cfs.Digest
	Packs []PackRef
	Index Index // Index.Packs == len(Packs)
}

// EncodeRepoIndex encodes x (its object index sorted first).
func EncodeRepoIndex(x RepoIndex) ([]byte, error) {
	if x.Index.Packs != len(x.Packs) {
		return nil, fmt.Errorf("pack index: the object index counts %d packs, %d are listed", x.Index.Packs, len(x.Packs))
	}
	if err := checkPackRefs(x.Packs); err != nil {
		return nil, err
	}
	idx, err := EncodeIndex(x.Index)
	if err != nil {
		return nil, err
	}
	b := append([]byte(repoIndexMagic), x.Image[:]...)
	b = binary.AppendUvarint(b, uint64(len(x.Packs)))
	for _, p := range x.Packs {
		b = append(b, p.SHA256[:]...)
		b = binary.AppendUvarint(b, uint64(p.Size))
	}
	return append(b, idx...), nil
}

// DecodeRepoIndex decodes a pack index of untrusted bytes: at most
// MaxIndexBytes, the magic, at most MaxPacks distinct packs of a sane
// size, canonical varints, and an object index (DecodeIndex) whose every
// object is inside its pack (CheckIndex).
func DecodeRepoIndex(b []byte) (*RepoIndex, error) {
	if len(b) > MaxIndexBytes {
		return nil, fmt.Errorf("pack index is %d bytes, more than %d", len(b), MaxIndexBytes)
	}
	if !bytes.HasPrefix(b, []byte(repoIndexMagic)) {
		return nil, errors.New("pack index: bad magic (not a version 1 pack index)")
	}
	r := indexReader{b: b[len(repoIndexMagic):]}
	var x RepoIndex
	if len(r.b) < cfs.DigestSize {
		return nil, errors.New("pack index: truncated image digest")
	}
	copy(x.Image[:], r.b)
	r.b = r.b[cfs.DigestSize:]
	if x.Image.IsZero() {
		return nil, errors.New("pack index: the zero image digest")
	}
	n, err := r.uvarint("pack count")
	if err != nil {
		return nil, err
	}
	if n > MaxPacks || n > uint64(len(r.b)/(sha256.Size+1)) {
		return nil, fmt.Errorf("pack index: %d packs do not fit (at most %d, and %d bytes follow)", n, MaxPacks, len(r.b))
	}
	x.Packs = make([]PackRef, n)
	for i := range x.Packs {
		if len(r.b) < sha256.Size {
			return nil, fmt.Errorf("pack index: pack %d truncated", i)
		}
		copy(x.Packs[i].SHA256[:], r.b)
		r.b = r.b[sha256.Size:]
		size, err := r.uvarint("pack size")
		if err != nil {
			return nil, err
		}
		if size < 2*BlockSize || size > 1<<50 {
			return nil, fmt.Errorf("pack index: pack %d has size %d", i, size)
		}
		x.Packs[i].Size = int64(size)
	}
	if err := checkPackRefs(x.Packs); err != nil {
		return nil, err
	}
	idx, err := DecodeIndex(r.b)
	if err != nil {
		return nil, fmt.Errorf("pack index: %w", err)
	}
	sizes := make([]int64, len(x.Packs))
	for i, p := range x.Packs {
		sizes[i] = p.Size
	}
	if err := CheckIndex(idx, sizes); err != nil {
		return nil, fmt.Errorf("pack index: %w", err)
	}
	x.Index = *idx
	return &x, nil
}

func checkPackRefs(packs []PackRef) error {
	seen := make(map[[sha256.Size]byte]bool, len(packs))
	for i, p := range packs {
		if seen[p.SHA256] {
			return fmt.Errorf("pack index: pack %d (%x) listed twice", i, p.SHA256)
		}
		seen[p.SHA256] = true
	}
	return nil
}
