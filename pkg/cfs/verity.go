package cfs

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"strings"
)

// VerityBlockSize is the fs-verity Merkle tree block size composefs uses.
const VerityBlockSize = 4096

// DigestSize is the size in bytes of an fs-verity SHA-256 digest.
const DigestSize = sha256.Size

// Digest is an fs-verity SHA-256 file digest (4096-byte blocks, no salt), the
// value `fsverity digest` prints and FS_IOC_MEASURE_VERITY returns.
type Digest [DigestSize]byte

// String returns the digest as 64 lowercase hex characters.
func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// ObjectPath returns the digest's path in an object store: "xx/yyyy…".
func (d Digest) ObjectPath() string {
	var b [2*DigestSize + 1]byte
	hex.Encode(b[:2], d[:1])
	b[2] = '/'
	hex.Encode(b[3:], d[1:])
	return string(b[:])
}

// IsZero reports whether d is the all-zero value (no digest).
func (d Digest) IsZero() bool { return d == Digest{} }

// ParseDigest parses 64 hex characters (either case) into a Digest.
func ParseDigest(s string) (Digest, error) {
	var d Digest
	if len(s) != 2*DigestSize {
		return d, fmt.Errorf("digest %q: want %d hex characters, got %d", truncateForError(s), 2*DigestSize, len(s))
	}
	if _, err := hex.Decode(d[:], []byte(s)); err != nil {
		return d, fmt.Errorf("digest %q: %w", truncateForError(s), err)
	}
	return d, nil
}

// ParseUserDigest parses a digest a user gives (a command's --digest, a
// volume's digest attribute): 64 hex characters, optionally after
// "sha256:". The all-zero digest is refused: no content has it, and the
// tools would take it for "no digest" and use an image unverified.
func ParseUserDigest(s string) (Digest, error) {
	d, err := ParseDigest(strings.TrimPrefix(s, "sha256:"))
	if err != nil {
		return d, err
	}
	if d.IsZero() {
		return d, fmt.Errorf("digest %s: the all-zero digest names no content (give the image's fs-verity digest)", s)
	}
	return d, nil
}

// ParseObjectPath parses a store path "xx/" + 62 lowercase hex characters.
func ParseObjectPath(p string) (Digest, error) {
	if len(p) != 2*DigestSize+1 || p[2] != '/' {
		return Digest{}, fmt.Errorf("object path %q: want xx/ followed by 62 hex characters", truncateForError(p))
	}
	s := p[:2] + p[3:]
	if !isLowerHex(s) {
		return Digest{}, fmt.Errorf("object path %q: not lowercase hex", truncateForError(p))
	}
	return ParseDigest(s)
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func truncateForError(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}

// VerityHash computes an fs-verity digest over a stream. It implements
// hash.Hash; memory use is one block per Merkle tree level, whatever the
// input size. The zero value is not usable: call NewVerityHash.
type VerityHash struct {
	// levels[0] buffers data; levels[i>0] buffer the hashes of level i-1.
	levels []verityLevel
	size   uint64
	// finish is scratch for rootHash, which finishes on a copy of levels.
	finish []verityLevel
}

type verityLevel struct {
	buf     [VerityBlockSize]byte
	n       int    // bytes pending in buf
	emitted uint64 // blocks of this level already hashed into the next
}

var _ hash.Hash = (*VerityHash)(nil)

// NewVerityHash returns a streaming fs-verity SHA-256 hasher.
func NewVerityHash() *VerityHash {
	// Two levels cover objects up to 512 KiB (most of them); more are
	// added as needed.
	return &VerityHash{levels: make([]verityLevel, 1, 2)}
}

// Size returns DigestSize.
func (v *VerityHash) Size() int { return DigestSize }

// BlockSize returns the Merkle tree block size.
func (v *VerityHash) BlockSize() int { return VerityBlockSize }

// Reset clears the hasher for reuse.
func (v *VerityHash) Reset() {
	v.levels = v.levels[:1]
	v.levels[0].n, v.levels[0].emitted = 0, 0
	v.size = 0
}

// Write adds data; it never fails.
func (v *VerityHash) Write(p []byte) (int, error) {
	total := len(p)
	v.size += uint64(total)
	// push may grow (move) levels: no pointer into it is kept across one.
	if l0 := &v.levels[0]; l0.n > 0 {
		c := copy(l0.buf[l0.n:], p)
		l0.n += c
		p = p[c:]
		if l0.n < VerityBlockSize {
			return total, nil
		}
		h := sha256.Sum256(l0.buf[:])
		l0.n = 0
		l0.emitted++
		v.push(1, h)
	}
	for len(p) >= VerityBlockSize {
		h := sha256.Sum256(p[:VerityBlockSize])
		v.levels[0].emitted++
		v.push(1, h)
		p = p[VerityBlockSize:]
	}
	v.levels[0].n = copy(v.levels[0].buf[:], p)
	return total, nil
}

// push appends a child hash to level i, hashing full blocks upward.
func (v *VerityHash) push(i int, h [DigestSize]byte) {
	for {
		if i == len(v.levels) {
			v.levels = append(v.levels, verityLevel{})
		}
		l := &v.levels[i]
		copy(l.buf[l.n:], h[:])
		l.n += DigestSize
		if l.n < VerityBlockSize {
			return
		}
		h = sha256.Sum256(l.buf[:])
		l.n = 0
		l.emitted++
		i++
	}
}

// rootHash returns the Merkle tree root without changing the hasher state:
// the hash of the only block of the lowest level that has exactly one block.
func (v *VerityHash) rootHash() [DigestSize]byte {
	if v.size == 0 {
		return [DigestSize]byte{}
	}
	// Finish on a copy so that Sum can be called mid-stream; the copy's
	// storage is kept for the next call.
	c := &VerityHash{levels: append(v.finish[:0], v.levels...), size: v.size}
	defer func() { v.finish = c.levels[:0] }()
	for i := 0; ; i++ {
		l := &c.levels[i]
		blocks := l.emitted
		if l.n > 0 {
			blocks++
		}
		if blocks == 1 && l.n == 0 {
			// The single block was hashed already; its hash is the only
			// entry of the level above.
			var r [DigestSize]byte
			copy(r[:], c.levels[i+1].buf[:DigestSize])
			return r
		}
		if l.n > 0 {
			clear(l.buf[l.n:])
			h := sha256.Sum256(l.buf[:])
			if blocks == 1 {
				return h
			}
			l.n = 0
			l.emitted++
			c.push(i+1, h)
		}
	}
}

// Sum appends the fs-verity digest of the data written so far to b.
func (v *VerityHash) Sum(b []byte) []byte {
	d := v.Digest()
	return append(b, d[:]...)
}

// Digest returns the fs-verity digest of the data written so far.
func (v *VerityHash) Digest() Digest {
	root := v.rootHash()
	var desc [256]byte
	desc[0] = 1  // version
	desc[1] = 1  // FS_VERITY_HASH_ALG_SHA256
	desc[2] = 12 // log2(block size)
	binary.LittleEndian.PutUint64(desc[8:], v.size)
	copy(desc[16:], root[:])
	return sha256.Sum256(desc[:])
}

// VerityDigestOf returns the fs-verity digest of b.
func VerityDigestOf(b []byte) Digest {
	h := NewVerityHash()
	h.Write(b)
	return h.Digest()
}

// VerityDigestReader returns the fs-verity digest of everything r yields.
func VerityDigestReader(r io.Reader) (Digest, int64, error) {
	h := NewVerityHash()
	n, err := io.CopyBuffer(h, r, make([]byte, 256*1024))
	if err != nil {
		return Digest{}, n, fmt.Errorf("reading data to hash: %w", err)
	}
	return h.Digest(), n, nil
}

// ContextReader reads r until ctx ends: a long hash of a large file stops
// between reads when its caller gives up.
func ContextReader(ctx context.Context, r io.Reader) io.Reader { return ctxReader{ctx, r} }

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
