package trust

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/internal/testsign"
)

func TestSignatureTag(t *testing.T) {
	d := "sha256:" + strings.Repeat("ab", 32)
	if got, want := SignatureTag(d), "sha256-"+strings.Repeat("ab", 32)+".sig"; got != want {
		t.Errorf("SignatureTag = %s, want %s", got, want)
	}
}

// Signatures of manifests as cosign sign --key stores them: the simple
// signing payload of the sha256-<hex>.sig tag's layers, and the sigstore
// bundle (DSSE, in-toto statement) of a referrer.
func TestVerifyManifest(t *testing.T) {
	const repo = "registry.example.com/team/app"
	sum := sha256.Sum256([]byte("a manifest"))
	manifest := "sha256:" + hex.EncodeToString(sum[:])
	otherSum := sha256.Sum256([]byte("another manifest"))
	other := "sha256:" + hex.EncodeToString(otherSum[:])

	signer, stranger := testsign.NewKey(t), testsign.NewKey(t)
	key, err := ParsePublicKey("publisher", []byte(signer.PEM))
	if err != nil {
		t.Fatal(err)
	}
	strangerKey, _ := ParsePublicKey("stranger", []byte(stranger.PEM))
	rule := &Rule{Keys: []*Key{strangerKey, key}}
	b64 := func(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

	payload := testsign.SimpleSigningPayload(t, repo, manifest)
	sig := signer.SignRaw(t, payload)
	if k, err := rule.VerifySimpleSigning(payload, b64(sig), manifest); err != nil || k != key {
		t.Fatalf("simple signing: %v, %v", k, err)
	}
	// ed25519 (pure and ph) and RSA keys, as cosign signs with them.
	for _, alg := range []string{"ed25519", "ed25519ph", "rsa", "ecdsa-p384"} {
		tk := newTestKey(t, alg)
		r := &Rule{Keys: []*Key{tk.key(t, alg)}}
		if _, err := r.VerifySimpleSigning(payload, b64(tk.sign(t, payload, alg == "ed25519ph")), manifest); err != nil {
			t.Errorf("%s simple signing: %v", alg, err)
		}
	}

	otherPayload := testsign.SimpleSigningPayload(t, repo, other)
	typed := bytes.Replace(payload, []byte("cosign container image signature"), []byte("atomic container signature"), 1)
	for _, c := range []struct {
		name      string
		payload   []byte
		sig       string
		digest    string
		rule      *Rule
		want      error
		mentioned string
	}{
		{"another key", payload, b64(stranger.SignRaw(t, payload)), manifest, &Rule{Keys: []*Key{key}}, ErrBadSignature, "any accepted key"},
		{"truncated signature", payload, b64(sig[:len(sig)-3]), manifest, rule, ErrBadSignature, ""},
		{"signature not base64", payload, "%%%", manifest, rule, ErrBadSignature, "annotation"},
		{"payload changed after signing", append(bytes.Clone(payload), ' '), b64(sig), manifest, rule, ErrBadSignature, ""},
		{"signs another manifest", otherPayload, b64(signer.SignRaw(t, otherPayload)), manifest, rule, ErrBadSignature, "signs manifest " + other},
		{"not a cosign signature", typed, b64(signer.SignRaw(t, typed)), manifest, rule, ErrBadSignature, "type"},
		{"signed garbage", []byte("{"), b64(signer.SignRaw(t, []byte("{"))), manifest, rule, ErrBadSignature, "payload"},
		{"no keys", payload, b64(sig), manifest, &Rule{}, ErrUnknownKey, ""},
	} {
		_, err := c.rule.VerifySimpleSigning(c.payload, c.sig, c.digest)
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.mentioned) {
			t.Errorf("%s: %v, want %v naming %q", c.name, err, c.want, c.mentioned)
		}
	}
	if _, err := rule.VerifySimpleSigning(payload, b64(sig), "sha256:abc"); err == nil || isVerdict(err) {
		t.Errorf("a malformed manifest digest: %v, want an error that is not a verdict", err)
	}

	bundle := signer.ManifestBundle(t, repo, manifest)
	if k, err := rule.VerifyManifestBundle(bundle, manifest); err != nil || k != key {
		t.Fatalf("bundle: %v, %v", k, err)
	}
	for _, c := range []struct {
		name   string
		bundle []byte
		digest string
		want   error
	}{
		{"bundle for another manifest", bundle, other, ErrBadSignature},
		{"bundle by a stranger", stranger.ManifestBundle(t, repo, manifest), manifest, nil}, // the stranger is in the rule
		{"bundle by an unknown key", stranger.ManifestBundle(t, repo, manifest), manifest, ErrUnknownKey},
		{"bundle damaged", bytes.Replace(bundle, []byte(`"sig":"`), []byte(`"sig":"AAAA`), 1), manifest, ErrBadSignature},
		{"a message signature, not a bundle", []byte(b64(sig)), manifest, ErrBadSignature},
	} {
		r := rule
		if c.name == "bundle by an unknown key" {
			r = &Rule{Keys: []*Key{key}}
		}
		_, err := r.VerifyManifestBundle(c.bundle, c.digest)
		if (c.want == nil) != (err == nil) || (c.want != nil && !errors.Is(err, c.want)) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
}

func isVerdict(err error) bool {
	return errors.Is(err, ErrUnsigned) || errors.Is(err, ErrUnknownKey) || errors.Is(err, ErrBadSignature)
}
