package trust

import (
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func pkcs1PEM(t testing.TB, pub crypto.PublicKey) []byte {
	t.Helper()
	return pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(pub.(*rsa.PublicKey))})
}

// sigstoreBundle writes a sigstore bundle (v0.3, key hint, message
// signature) as cosign sign-blob --new-bundle-format does.
func sigstoreBundle(hint string, digest, sig []byte) []byte {
	b, _ := json.Marshal(map[string]any{
		"mediaType":            "application/vnd.dev.sigstore.bundle.v0.3+json",
		"verificationMaterial": map[string]any{"publicKey": map[string]any{"hint": hint}},
		"messageSignature": map[string]any{
			"messageDigest": map[string]any{"algorithm": "SHA2_256", "digest": base64.StdEncoding.EncodeToString(digest)},
			"signature":     base64.StdEncoding.EncodeToString(sig),
		},
	})
	return b
}

func TestVerifyBlob(t *testing.T) {
	blob := []byte("the image's bytes\x00\x01")
	other := []byte("other bytes")
	for _, alg := range []string{"ecdsa", "ecdsa-p384", "rsa", "ed25519", "ed25519ph"} {
		t.Run(alg, func(t *testing.T) {
			tk := newTestKey(t, alg)
			stranger := newTestKey(t, alg)
			key := tk.key(t, "publisher")
			rule := &Rule{Keys: []*Key{stranger.key(t, "someone else"), key}}
			ph := alg == "ed25519ph"
			sig := tk.sign(t, blob, ph)
			sum := sha256.Sum256(blob)
			forms := map[string][]byte{
				"base64":          []byte(base64.StdEncoding.EncodeToString(sig) + "\n"),
				"raw":             sig,
				"cosign bundle":   []byte(fmt.Sprintf(`{"base64Signature":%q}`, base64.StdEncoding.EncodeToString(sig))),
				"sigstore bundle": sigstoreBundle(key.Hint, sum[:], sig),
			}
			for form, material := range forms {
				s, err := ParseBlobSignature(material)
				if err != nil {
					t.Fatalf("%s: %v", form, err)
				}
				got, err := rule.VerifyBlob(s, blobOf(blob))
				if err != nil || got != key {
					t.Errorf("%s: VerifyBlob = %v, %v; want the publisher's key", form, got, err)
				}
				// The same signature over other content.
				if _, err := rule.VerifyBlob(s, blobOf(other)); !errors.Is(err, ErrBadSignature) {
					t.Errorf("%s over other content: %v, want ErrBadSignature", form, err)
				}
				// Only the stranger's key accepted.
				if _, err := (&Rule{Keys: rule.Keys[:1]}).VerifyBlob(s, blobOf(blob)); err == nil {
					t.Errorf("%s with an unknown key: accepted", form)
				}
			}
		})
	}
}

func TestVerifyBlobVerdicts(t *testing.T) {
	blob := []byte("image")
	tk, stranger := newTestKey(t, "ecdsa"), newTestKey(t, "ecdsa")
	key := tk.key(t, "publisher")
	rule := &Rule{Keys: []*Key{key}}
	sig := tk.sign(t, blob, false)
	sum := sha256.Sum256(blob)
	otherSum := sha256.Sum256([]byte("other"))
	strangerKey := stranger.key(t, "x")
	b64 := base64.StdEncoding.EncodeToString(sig)
	cases := []struct {
		name     string
		material []byte
		want     error
		msg      string
	}{
		{"truncated", []byte(b64[:len(b64)/2]), ErrBadSignature, "does not verify"},
		{"truncated raw", sig[:len(sig)-3], ErrBadSignature, "does not verify"},
		{"a flipped byte", []byte(base64.StdEncoding.EncodeToString(append(append([]byte{}, sig[:10]...), append([]byte{sig[10] ^ 1}, sig[11:]...)...))), ErrBadSignature, ""},
		{"by another key", []byte(base64.StdEncoding.EncodeToString(stranger.sign(t, blob, false))), ErrBadSignature, "made by another key"},
		{"bundle for another digest", sigstoreBundle(key.Hint, otherSum[:], sig), ErrBadSignature, "signs content with sha256:" + fmt.Sprintf("%x", otherSum[:])},
		{"bundle by an unknown key", sigstoreBundle(strangerKey.Hint, sum[:], stranger.sign(t, blob, false)), ErrUnknownKey, "matches none of"},
		{"bundle with a bad signature", sigstoreBundle(key.Hint, sum[:], sig[:20]), ErrBadSignature, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, err := ParseBlobSignature(c.material)
			if err == nil {
				_, err = rule.VerifyBlob(s, blobOf(blob))
			}
			if !errors.Is(err, c.want) || !strings.Contains(fmt.Sprint(err), c.msg) {
				t.Fatalf("got %v, want %v containing %q", err, c.want, c.msg)
			}
		})
	}
}

func TestParseBlobSignatureErrors(t *testing.T) {
	cases := map[string]string{
		"empty":                   " \n",
		"JSON of neither kind":    `{"foo":1}`,
		"not a sigstore bundle":   `{"mediaType":"application/json"}`,
		"cosign bundle, no b64":   `{"base64Signature":"%%%"}`,
		"keyless cosign bundle":   `{"base64Signature":"AAAA","cert":"LS0t"}`,
		"sigstore bundle, bad":    `{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json"}`,
		"sigstore bundle, v0.9":   `{"mediaType":"application/vnd.dev.sigstore.bundle.v0.9+json"}`,
		"sigstore bundle keyless": `{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"certificate":{"rawBytes":"AAAA"}},"messageSignature":{"signature":"AAAA"}}`,
		"broken JSON":             `{"base64Signature":`,
	}
	for name, in := range cases {
		if _, err := ParseBlobSignature([]byte(in)); !errors.Is(err, ErrBadSignature) {
			t.Errorf("%s: %v, want ErrBadSignature", name, err)
		}
	}
	if _, err := ParseBlobSignature(make([]byte, MaxSignatureBytes+1)); !errors.Is(err, ErrBadSignature) {
		t.Errorf("oversized: %v", err)
	}
}

func TestVerifyBlobNoKeys(t *testing.T) {
	s, err := ParseBlobSignature([]byte("AAAA"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (&Rule{}).VerifyBlob(s, blobOf(nil)); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("no keys: %v", err)
	}
}
