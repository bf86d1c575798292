package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// MaxSignatureBytes bounds one signature file a source serves.
const MaxSignatureBytes = 1 << 20

// SignatureFile is signature material a source publishes beside an image.
type SignatureFile struct {
	// Location says where it came from (a URL), for messages.
	Location string
	Data     []byte
}

// SignatureSource is implemented by sources that publish cosign sign-blob
// signatures beside image files. ImageSignatures returns what is
// published for the image ref names (nothing, without error, when no
// signature is published); the signatures are over the image file's
// bytes, so they are checked against the image as stored.
type SignatureSource interface {
	ImageSignatures(ctx context.Context, ref ImageRef) ([]SignatureFile, error)
}

// Signature files of an HTTP repository, beside BASE/images/NAME: the
// signature cosign sign-blob --output-signature writes, and the bundle
// --bundle writes.
var httpSignatureSuffixes = []string{".sig", ".bundle"}

// ImageSignatures GETs BASE/images/NAME.sig and BASE/images/NAME.bundle;
// a 404 (or 410) means that one is not published.
func (s *HTTPSource) ImageSignatures(ctx context.Context, ref ImageRef) ([]SignatureFile, error) {
	name := ref.name()
	if err := ValidImageName(name); err != nil {
		return nil, err
	}
	var out []SignatureFile
	for _, suffix := range httpSignatureSuffixes {
		u := s.url("images", name+suffix)
		resp, err := s.get(ctx, "fetching signature", u)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		b, err := readSignature(httpBody{ReadCloser: resp.Body, op: "reading signature", url: resp.Request.URL}, resp.ContentLength)
		resp.Body.Close()
		if err != nil {
			return nil, &SourceError{Op: "fetching signature", URL: u, Err: err}
		}
		out = append(out, SignatureFile{Location: RedactURL(resp.Request.URL.String()), Data: b})
	}
	return out, nil
}

// readSignature reads a signature body of at most MaxSignatureBytes.
func readSignature(r io.Reader, announced int64) ([]byte, error) {
	if announced > MaxSignatureBytes {
		return nil, fmt.Errorf("%d bytes, more than the %d a signature may have: %w", announced, MaxSignatureBytes, ErrSizeMismatch)
	}
	b, err := io.ReadAll(io.LimitReader(r, MaxSignatureBytes+1))
	if err != nil {
		return nil, Transient(err)
	}
	if len(b) > MaxSignatureBytes {
		return nil, fmt.Errorf("more than the %d bytes a signature may have: %w", MaxSignatureBytes, ErrSizeMismatch)
	}
	if announced >= 0 && int64(len(b)) != announced {
		return nil, Transient(fmt.Errorf("short read: got %d of %d bytes", len(b), announced))
	}
	return b, nil
}

// Signatures fetches the signature files src publishes for ref, retrying
// transient failures as image downloads do. A source that publishes no
// signatures (not a SignatureSource) returns none.
func (s *Store) Signatures(ctx context.Context, src Source, ref ImageRef) ([]SignatureFile, error) {
	ss, ok := src.(SignatureSource)
	if !ok {
		return nil, nil
	}
	var out []SignatureFile
	err := s.retry(ctx, "signatures of "+ref.String(), func(ctx context.Context) error {
		var err error
		out, err = ss.ImageSignatures(ctx, ref)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("fetching the signatures of image %s from %s: %w", ref, src, err)
	}
	return out, nil
}

// ManifestSignature is signature material a registry holds for a
// manifest: one layer of cosign's signature manifest (tag
// sha256-<hex>.sig), or the sigstore bundle of a referrer.
type ManifestSignature struct {
	// Location says where it came from, for messages.
	Location string
	// Payload and Signature: the simple signing payload (the layer's
	// bytes) and its base64 signature (the layer's annotation).
	Payload   []byte
	Signature string
	// Keyless: the layer carries a certificate (cosign keyless signing),
	// which this node does not verify.
	Keyless bool
	// Bundle: a sigstore bundle (JSON).
	Bundle []byte
}

// ManifestSigner is implemented by registry sources, whose images cosign
// signs by manifest digest.
type ManifestSigner interface {
	// ResolveManifest returns the digest ("sha256:…") and the bytes of the
	// manifest or index name (a tag or a digest) names now (the bytes
	// checked against the digest).
	ResolveManifest(ctx context.Context, name string) (string, []byte, error)
	// ManifestSignatures returns the signature material the registry
	// holds for the manifest of that digest (none, without error, when it
	// holds none).
	ManifestSignatures(ctx context.Context, manifestDigest string) ([]ManifestSignature, error)
}

// SignedManifest is what a registry name resolved to, with the signature
// material the registry holds for it.
type SignedManifest struct {
	// Digest ("sha256:…") and Bytes of the manifest or index.
	Digest string
	Bytes  []byte
	// Signatures of Digest.
	Signatures []ManifestSignature
}

// ManifestSignatures resolves name (a tag or a digest) with src and
// fetches the signatures of the manifest it names, retrying transient
// failures as image downloads do.
func (s *Store) ManifestSignatures(ctx context.Context, src ManifestSigner, name string) (SignedManifest, error) {
	var m SignedManifest
	err := s.retry(ctx, "signatures of "+name, func(ctx context.Context) error {
		var err error
		if m.Digest == "" {
			if m.Digest, m.Bytes, err = src.ResolveManifest(ctx, name); err != nil {
				return err
			}
		}
		m.Signatures, err = src.ManifestSignatures(ctx, m.Digest)
		return err
	})
	if err != nil {
		return SignedManifest{}, fmt.Errorf("fetching the signatures of %s from %s: %w", name, src, err)
	}
	return m, nil
}
