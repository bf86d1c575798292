// Package trust is the node's trust in image publishers: a policy saying,
// per source prefix, which public keys may sign images and whether a
// signature is required, and the verification of cosign's signatures
// (sign-blob signatures and bundles over image files; signatures of OCI
// manifests, as cosign sign stores them) with sigstore's libraries.
//
// Verification is key-based and offline: a transparency-log entry or a
// certificate in a bundle is neither needed nor consulted.
package trust

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"

	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/sigstore/sigstore/pkg/signature/options"
)

// Key is a public key the policy accepts.
type Key struct {
	// Name is the name the policy gives the key (for messages).
	Name string
	// ID is the hex SHA-256 of the key's DER SubjectPublicKeyInfo.
	ID string
	// Hint is what cosign writes as the key hint in a bundle: the
	// standard base64 of the same SHA-256.
	Hint string
	// Algorithm names the key type: "ecdsa-p256", "ed25519", "rsa-3072"…
	Algorithm string

	pub crypto.PublicKey
	// verifiers check a signature with the key the ways cosign signs
	// with it: ECDSA and RSA PKCS#1 v1.5 with the key's default hash;
	// ed25519 pure (what sign-blob writes without a transparency log)
	// and ed25519ph (what it writes with one).
	verifiers []signature.Verifier
}

// String names the key for messages.
func (k *Key) String() string {
	if k.Name != "" {
		return fmt.Sprintf("%q (%s, sha256:%s)", k.Name, k.Algorithm, k.ID[:16])
	}
	return fmt.Sprintf("%s sha256:%s", k.Algorithm, k.ID[:16])
}

// PublicKey returns the key.
func (k *Key) PublicKey() crypto.PublicKey { return k.pub }

// maxKeyPEM bounds one key's PEM text.
const maxKeyPEM = 16 << 10

// ParsePublicKey parses one PEM public key ("PUBLIC KEY", PKIX; or "RSA
// PUBLIC KEY", PKCS #1): ECDSA P-256, P-384 or P-521, ed25519, or RSA of
// 2048, 3072 or 4096 bits, as cosign's generate-key-pair and
// import-key-pair write them. Text after the first PEM block is refused,
// so that a second key pasted by mistake is not silently ignored.
func ParsePublicKey(name string, pemText []byte) (*Key, error) {
	if len(pemText) > maxKeyPEM {
		return nil, fmt.Errorf("%d bytes, more than %d for one public key", len(pemText), maxKeyPEM)
	}
	block, rest := pem.Decode(pemText)
	if block == nil {
		return nil, errors.New("no PEM block found (want -----BEGIN PUBLIC KEY-----)")
	}
	if next, _ := pem.Decode(rest); next != nil {
		return nil, errors.New("more than one PEM block (give each key its own entry)")
	}
	if block.Type == "CERTIFICATE" {
		return nil, errors.New("a certificate, not a public key (verification here is key-based)")
	}
	pub, err := cryptoutils.UnmarshalPEMToPublicKey(pem.EncodeToMemory(block))
	if err != nil {
		return nil, err
	}
	alg, err := algorithm(pub)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("encoding the key: %w", err)
	}
	sum := sha256.Sum256(der)
	k := &Key{Name: name, ID: hex.EncodeToString(sum[:]), Hint: base64.StdEncoding.EncodeToString(sum[:]), Algorithm: alg, pub: pub}
	v, err := signature.LoadDefaultVerifier(pub)
	if err != nil {
		return nil, fmt.Errorf("loading the key: %w", err)
	}
	k.verifiers = append(k.verifiers, v)
	if _, ok := pub.(ed25519.PublicKey); ok {
		ph, err := signature.LoadDefaultVerifier(pub, options.WithED25519ph())
		if err != nil {
			return nil, fmt.Errorf("loading the key: %w", err)
		}
		k.verifiers = append(k.verifiers, ph)
	}
	return k, nil
}

// algorithm names the key type and refuses what cosign does not sign with.
func algorithm(pub crypto.PublicKey) (string, error) {
	switch pk := pub.(type) {
	case *ecdsa.PublicKey:
		switch pk.Curve {
		case elliptic.P256():
			return "ecdsa-p256", nil
		case elliptic.P384():
			return "ecdsa-p384", nil
		case elliptic.P521():
			return "ecdsa-p521", nil
		}
		return "", fmt.Errorf("ECDSA curve %s is not supported (P-256, P-384 or P-521)", pk.Curve.Params().Name)
	case *rsa.PublicKey:
		switch bits := pk.N.BitLen(); bits {
		case 2048, 3072, 4096:
			return fmt.Sprintf("rsa-%d", bits), nil
		default:
			return "", fmt.Errorf("RSA key of %d bits is not supported (2048, 3072 or 4096)", bits)
		}
	case ed25519.PublicKey:
		return "ed25519", nil
	}
	return "", fmt.Errorf("key type %T is not supported (ECDSA, ed25519 or RSA)", pub)
}

// verify checks sig over the message open returns with every way the key
// signs. The message is read once per way (a local file: cheap).
func (k *Key) verify(sig []byte, open func() (io.ReadCloser, error)) error {
	var last error
	for _, v := range k.verifiers {
		r, err := open()
		if err != nil {
			return &readError{err}
		}
		err = v.VerifySignature(bytes.NewReader(sig), r)
		r.Close()
		if err == nil {
			return nil
		}
		last = err
	}
	return last
}

// readError is a failure to read the signed content (not a verdict).
type readError struct{ err error }

func (e *readError) Error() string { return "reading the signed content: " + e.err.Error() }
func (e *readError) Unwrap() error { return e.err }
