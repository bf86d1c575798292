package trust

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/sigstore/sigstore/pkg/signature/options"
)

// testKey is a key pair of the tests.
type testKey struct {
	priv crypto.Signer
	pem  string // the public key, PEM
}

func newTestKey(t testing.TB, alg string) testKey {
	t.Helper()
	var priv crypto.Signer
	var err error
	switch alg {
	case "ecdsa":
		priv, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "ecdsa-p384":
		priv, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "rsa":
		priv, err = rsa.GenerateKey(rand.Reader, 2048)
	case "rsa-1024":
		priv, err = rsa.GenerateKey(rand.Reader, 1024)
	case "ed25519", "ed25519ph":
		_, priv, err = ed25519.GenerateKey(rand.Reader)
	default:
		t.Fatalf("unknown algorithm %s", alg)
	}
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	return testKey{priv: priv, pem: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))}
}

// sign signs msg the way cosign does with the key (ed25519ph when ph).
func (k testKey) sign(t testing.TB, msg []byte, ph bool) []byte {
	t.Helper()
	var opts []signature.LoadOption
	if ph {
		opts = append(opts, options.WithED25519ph())
	}
	sv, err := signature.LoadDefaultSignerVerifier(k.priv, opts...)
	if err != nil {
		t.Fatal(err)
	}
	sig, err := sv.SignMessage(bytes.NewReader(msg))
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

func (k testKey) key(t testing.TB, name string) *Key {
	t.Helper()
	key, err := ParsePublicKey(name, []byte(k.pem))
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// blobOf is content for VerifyBlob.
func blobOf(b []byte) Blob {
	return Blob{Open: func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }, SHA256: sha256.Sum256(b)}
}

// policyYAML writes a policy with one rule.
func policyYAML(prefix string, require bool, keys ...testKey) string {
	var b strings.Builder
	fmt.Fprintf(&b, "sources:\n- prefix: %s\n  requireSignature: %v\n  keys:\n", prefix, require)
	for i, k := range keys {
		fmt.Fprintf(&b, "  - name: key-%d\n    publicKey: |\n", i)
		for _, l := range strings.Split(strings.TrimSpace(k.pem), "\n") {
			fmt.Fprintf(&b, "      %s\n", l)
		}
	}
	if len(keys) == 0 {
		b.WriteString("    []\n")
	}
	return b.String()
}
