package trust

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/sigstore/sigstore/pkg/signature/payload"
)

// Manifest signatures, as cosign sign --key stores them in a registry.
const (
	// SimpleSigningMediaType is the media type of the payload layer of
	// cosign's signature manifest (tag sha256-<hex>.sig).
	SimpleSigningMediaType = "application/vnd.dev.cosign.simplesigning.v1+json"
	// SignatureAnnotation holds the base64 signature over that payload.
	SignatureAnnotation = "dev.cosignproject.cosign/signature"
	// CertificateAnnotation is set on keyless signatures.
	CertificateAnnotation = "dev.sigstore.cosign/certificate"
	// BundleArtifactPrefix starts the artifactType of a referrer holding a
	// sigstore bundle (newer cosign: application/vnd.dev.sigstore.bundle.v0.3+json).
	BundleArtifactPrefix = sigstoreBundlePrefix
)

// SignatureTag is the tag under which cosign stores the signatures of the
// manifest of digest manifestDigest ("sha256:<hex>"): sha256-<hex>.sig.
func SignatureTag(manifestDigest string) string {
	return strings.Replace(manifestDigest, ":", "-", 1) + ".sig"
}

// manifestSHA256 checks a manifest digest and returns its bytes.
func manifestSHA256(manifestDigest string) ([]byte, error) {
	hexPart, ok := strings.CutPrefix(manifestDigest, "sha256:")
	if !ok || len(hexPart) != 64 || strings.ToLower(hexPart) != hexPart {
		return nil, fmt.Errorf("manifest digest %q is not sha256:<64 hex>", truncate(manifestDigest))
	}
	return hex.DecodeString(hexPart)
}

// VerifySimpleSigning checks one layer of cosign's signature manifest:
// sigB64 (the layer's SignatureAnnotation) must verify over the payload
// (the layer's bytes) with one of the rule's keys, and the payload, once
// verified, must be a cosign container image signature of manifestDigest.
// The identity it claims (docker-reference) is not checked: an image
// copied to another repository keeps its signature, and the policy's
// prefix already says which repositories a key speaks for.
func (r *Rule) VerifySimpleSigning(payloadBytes []byte, sigB64, manifestDigest string) (*Key, error) {
	want, err := manifestSHA256(manifestDigest)
	if err != nil {
		return nil, err
	}
	if len(r.Keys) == 0 {
		return nil, fmt.Errorf("%w: the trust policy lists no key for this source", ErrUnknownKey)
	}
	if len(payloadBytes) > MaxSignatureBytes {
		return nil, fmt.Errorf("%w: a payload of %d bytes, more than %d", ErrBadSignature, len(payloadBytes), MaxSignatureBytes)
	}
	sig, err := base64.StdEncoding.DecodeString(strings.TrimSpace(sigB64))
	if err != nil || len(sig) == 0 {
		return nil, fmt.Errorf("%w: the %s annotation is not base64", ErrBadSignature, SignatureAnnotation)
	}
	open := func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(payloadBytes)), nil }
	var key *Key
	for _, k := range r.Keys {
		if k.verify(sig, open) == nil {
			key = k
			break
		}
	}
	if key == nil {
		return nil, fmt.Errorf("%w over its payload with any accepted key (%s): it was made by another key or is damaged", ErrBadSignature, keyList(r.Keys))
	}
	var p payload.SimpleContainerImage
	if err := json.Unmarshal(payloadBytes, &p); err != nil {
		return nil, fmt.Errorf("%w: the signed payload is not a simple signing payload: %v", ErrBadSignature, err)
	}
	if p.Critical.Type != payload.CosignSignatureType {
		return nil, fmt.Errorf("%w: the signed payload has type %q, not %q", ErrBadSignature, truncate(p.Critical.Type), payload.CosignSignatureType)
	}
	got, err := manifestSHA256(p.Critical.Image.DockerManifestDigest)
	if err != nil {
		return nil, fmt.Errorf("%w: the signed payload names no manifest digest: %v", ErrBadSignature, err)
	}
	if !bytes.Equal(got, want) {
		return nil, fmt.Errorf("%w: it signs manifest %s, not %s", ErrBadSignature, p.Critical.Image.DockerManifestDigest, manifestDigest)
	}
	return key, nil
}

// VerifyManifestBundle checks a sigstore bundle (a referrer's layer, as
// newer cosign writes it: a DSSE envelope whose in-toto statement names
// the manifest, or a message signature over it) against manifestDigest
// with the rule's keys.
func (r *Rule) VerifyManifestBundle(b []byte, manifestDigest string) (*Key, error) {
	want, err := manifestSHA256(manifestDigest)
	if err != nil {
		return nil, err
	}
	if len(r.Keys) == 0 {
		return nil, fmt.Errorf("%w: the trust policy lists no key for this source", ErrUnknownKey)
	}
	sig, err := ParseBlobSignature(b)
	if err != nil {
		return nil, err
	}
	if sig.bundle == nil {
		return nil, fmt.Errorf("%w: the referrer's layer is not a sigstore bundle", ErrBadSignature)
	}
	return verifyBundle(r.Keys, sig, bundleArtifact{sha256: want})
}
