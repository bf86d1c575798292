package trust

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/sigstore/sigstore-go/pkg/bundle"
)

// Verdicts. Each is final for the content it was reached on: the driver
// answers PermissionDenied.
var (
	// ErrUnsigned: no signature is published and the policy requires one.
	ErrUnsigned = errors.New("the image is not signed and the trust policy requires a signature")
	// ErrUnknownKey: the signature names a key the policy does not accept.
	ErrUnknownKey = errors.New("signed by a key the trust policy does not accept")
	// ErrBadSignature: the signature does not verify over this content
	// with any accepted key (malformed or truncated, made for other
	// content, or made by another key).
	ErrBadSignature = errors.New("the signature does not verify")
)

// MaxSignatureBytes bounds signature material (a .sig, a bundle, a
// payload).
const MaxSignatureBytes = 1 << 20

// Bundle media type prefix of sigstore bundles.
const sigstoreBundlePrefix = "application/vnd.dev.sigstore.bundle"

// BlobSignature is signature material over a file, as cosign sign-blob
// writes it: a signature (base64, or raw with --b64=false), cosign's
// bundle JSON (base64Signature), or a sigstore bundle
// (--new-bundle-format).
type BlobSignature struct {
	raw    []byte         // the signature bytes (.sig, cosign's bundle)
	bundle *bundle.Bundle // a sigstore bundle
	// hint is the key hint a sigstore bundle carries ("" when none).
	hint string
	// digest is the SHA-256 a sigstore bundle's message signature says
	// it signs (nil when it signs another way).
	digest []byte
}

// Kind names the material's form for messages.
func (s *BlobSignature) Kind() string {
	if s.bundle != nil {
		return "sigstore bundle"
	}
	return "signature"
}

// cosignBundle is cosign's own bundle format (LocalSignedPayload).
type cosignBundle struct {
	Base64Signature string          `json:"base64Signature"`
	Cert            string          `json:"cert"`
	RekorBundle     json.RawMessage `json:"rekorBundle"`
}

// ParseBlobSignature parses signature material over a file. It checks the
// form only; Verify checks the signature.
func ParseBlobSignature(b []byte) (*BlobSignature, error) {
	if len(b) > MaxSignatureBytes {
		return nil, fmt.Errorf("%w: %d bytes of signature material, more than %d", ErrBadSignature, len(b), MaxSignatureBytes)
	}
	t := bytes.TrimSpace(b)
	if len(t) == 0 {
		return nil, fmt.Errorf("%w: the signature file is empty", ErrBadSignature)
	}
	if t[0] == '{' {
		return parseJSONSignature(t)
	}
	if sig, err := base64.StdEncoding.DecodeString(string(t)); err == nil {
		if len(sig) == 0 {
			return nil, fmt.Errorf("%w: the signature is empty", ErrBadSignature)
		}
		return &BlobSignature{raw: sig}, nil
	}
	// cosign sign-blob --b64=false writes the signature raw.
	return &BlobSignature{raw: bytes.Clone(b)}, nil
}

func parseJSONSignature(t []byte) (*BlobSignature, error) {
	var probe struct {
		MediaType       *string `json:"mediaType"`
		Base64Signature *string `json:"base64Signature"`
	}
	if err := json.Unmarshal(t, &probe); err != nil {
		return nil, fmt.Errorf("%w: not a signature bundle: %v", ErrBadSignature, err)
	}
	switch {
	case probe.MediaType != nil:
		if !strings.HasPrefix(*probe.MediaType, sigstoreBundlePrefix) {
			return nil, fmt.Errorf("%w: bundle media type %q is not a sigstore bundle", ErrBadSignature, truncate(*probe.MediaType))
		}
		return parseSigstoreBundle(t)
	case probe.Base64Signature != nil:
		var cb cosignBundle
		if err := json.Unmarshal(t, &cb); err != nil {
			return nil, fmt.Errorf("%w: cosign bundle: %v", ErrBadSignature, err)
		}
		if cb.Cert != "" {
			return nil, fmt.Errorf("%w: the cosign bundle holds a certificate (a keyless signature); this node verifies key-based signatures (cosign sign-blob --key)", ErrBadSignature)
		}
		sig, err := base64.StdEncoding.DecodeString(strings.TrimSpace(cb.Base64Signature))
		if err != nil || len(sig) == 0 {
			return nil, fmt.Errorf("%w: cosign bundle: base64Signature is not base64", ErrBadSignature)
		}
		return &BlobSignature{raw: sig}, nil
	}
	return nil, fmt.Errorf("%w: JSON that is neither a sigstore bundle (mediaType) nor a cosign bundle (base64Signature)", ErrBadSignature)
}

func parseSigstoreBundle(t []byte) (*BlobSignature, error) {
	var b bundle.Bundle
	if err := b.UnmarshalJSON(t); err != nil {
		return nil, fmt.Errorf("%w: sigstore bundle: %v", ErrBadSignature, err)
	}
	vm := b.GetVerificationMaterial()
	if vm.GetCertificate() != nil || vm.GetX509CertificateChain() != nil {
		return nil, fmt.Errorf("%w: the sigstore bundle holds a certificate (a keyless signature); this node verifies key-based signatures (--key)", ErrBadSignature)
	}
	if vm.GetPublicKey() == nil {
		return nil, fmt.Errorf("%w: the sigstore bundle names no public key", ErrBadSignature)
	}
	s := &BlobSignature{bundle: &b, hint: vm.GetPublicKey().GetHint()}
	if ms := b.GetMessageSignature(); ms != nil {
		if md := ms.GetMessageDigest(); md != nil && md.GetAlgorithm().String() == "SHA2_256" {
			s.digest = md.GetDigest()
		}
	}
	return s, nil
}

// Blob is the content a blob signature is checked against.
type Blob struct {
	// Open reads the content from its start (it may be called several
	// times).
	Open func() (io.ReadCloser, error)
	// SHA256 is the content's SHA-256.
	SHA256 [sha256.Size]byte
}

// VerifyBlob checks sig over blob with the rule's keys and returns the key
// that verifies it. Failures wrap ErrUnknownKey or ErrBadSignature (a
// verdict) or are errors reading the blob.
func (r *Rule) VerifyBlob(sig *BlobSignature, blob Blob) (*Key, error) {
	return verifyBlob(r.Keys, sig, blob)
}

func verifyBlob(keys []*Key, sig *BlobSignature, blob Blob) (*Key, error) {
	if len(keys) == 0 {
		return nil, fmt.Errorf("%w: the trust policy lists no key for this source", ErrUnknownKey)
	}
	if sig.bundle != nil {
		return verifyBundle(keys, sig, bundleArtifact{open: blob.Open, sha256: blob.SHA256[:]})
	}
	var rerr *readError
	for _, k := range keys {
		err := k.verify(sig.raw, blob.Open)
		if err == nil {
			return k, nil
		}
		if errors.As(err, &rerr) {
			return nil, err
		}
	}
	return nil, fmt.Errorf("%w over this image with any accepted key (%s): it was made by another key, for other content, or is damaged", ErrBadSignature, keyList(keys))
}

// keyList names keys for messages (at most a few).
func keyList(keys []*Key) string {
	var b strings.Builder
	for i, k := range keys {
		if i == 4 {
			fmt.Fprintf(&b, " and %d more", len(keys)-i)
			break
		}
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(k.String())
	}
	return b.String()
}

// truncate shortens untrusted text quoted in messages.
func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
