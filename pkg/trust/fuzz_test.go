package trust

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"testing"

	"github.com/csi-composefs/csi-composefs/internal/testsign"
)

// fixedKey is a P-256 key made from a constant, so that fuzz seeds stay
// valid across runs.
func fixedKey(t testing.TB) testKey {
	t.Helper()
	c := elliptic.P256()
	d := new(big.Int).SetBytes(sha256.New().Sum([]byte("csi-composefs fuzz key")))
	d.Mod(d, c.Params().N)
	priv, err := ecdsa.ParseRawPrivateKey(c, d.FillBytes(make([]byte, 32)))
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return testKey{priv: priv, pem: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))}
}

// FuzzParsePolicy: any bytes are a policy or an error; a policy's rules
// have canonical prefixes and keys that parse.
func FuzzParsePolicy(f *testing.F) {
	k := fixedKey(f)
	f.Add([]byte(policyYAML("https://repo.example.com/team", true, k)))
	f.Add([]byte("sources:\n- prefix: \"*\"\n- prefix: oci://r.example.com/a\n  requireSignature: false\n"))
	f.Add([]byte(`{"sources":[{"prefix":"docker://docker.io/library","keys":[]}]}`))
	f.Add([]byte("sources: [\n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParsePolicy(data)
		if err != nil {
			return
		}
		for _, r := range p.Rules() {
			if c, err := CanonicalPrefix(r.Prefix); err != nil || c != r.Prefix {
				t.Fatalf("rule prefix %q is not canonical (%q, %v)", r.Prefix, c, err)
			}
			if r.Require && len(r.Keys) == 0 {
				t.Fatalf("rule %s requires signatures without keys", r.Prefix)
			}
			if got := p.Rule(r.Prefix); got == nil {
				t.Fatalf("rule %s does not match its own prefix", r.Prefix)
			}
		}
	})
}

// FuzzVerifyBlob: signature material from a source is parsed and checked
// against a fixed blob and key; whatever it holds, the verdict is a
// verdict (never a panic), and only the real signature verifies.
func FuzzVerifyBlob(f *testing.F) {
	k := fixedKey(f)
	key := k.key(f, "fuzz")
	rule := &Rule{Keys: []*Key{key}}
	blob := []byte("the image")
	sum := sha256.Sum256(blob)
	sig := k.sign(f, blob, false)
	f.Add([]byte(base64.StdEncoding.EncodeToString(sig)))
	f.Add(sig)
	f.Add([]byte(fmt.Sprintf(`{"base64Signature":%q}`, base64.StdEncoding.EncodeToString(sig))))
	f.Add(sigstoreBundle(key.Hint, sum[:], sig))
	f.Add([]byte(`{"mediaType":"application/vnd.dev.sigstore.bundle.v0.1+json","verificationMaterial":{"publicKey":{"hint":"x"},"tlogEntries":[{}]},"dsseEnvelope":{"payload":"e30=","payloadType":"application/vnd.in-toto+json","signatures":[{"sig":"AAAA"}]}}`))
	f.Fuzz(func(t *testing.T, material []byte) {
		s, err := ParseBlobSignature(material)
		if err != nil {
			if !errors.Is(err, ErrBadSignature) {
				t.Fatalf("parse error is not a verdict: %v", err)
			}
			return
		}
		got, err := rule.VerifyBlob(s, blobOf(blob))
		if err != nil {
			if !errors.Is(err, ErrBadSignature) && !errors.Is(err, ErrUnknownKey) {
				t.Fatalf("verify error is not a verdict: %v", err)
			}
			return
		}
		if got != key {
			t.Fatalf("verified by %v", got)
		}
		// Whatever verified holds a valid signature by the key over the
		// blob: it must fail over other content.
		if _, err := rule.VerifyBlob(s, blobOf([]byte("other"))); err == nil {
			t.Fatalf("material %q verifies over other content too", material)
		}
	})
}

// FuzzVerifyManifestSignature: what a registry holds for a manifest (a
// referrer's bundle; a signature layer's payload and annotation) is
// checked against a fixed manifest digest and key: the outcome is a
// verdict (never a panic), and what verifies fails for another manifest.
func FuzzVerifyManifestSignature(f *testing.F) {
	k := fixedKey(f)
	key := k.key(f, "fuzz")
	rule := &Rule{Keys: []*Key{key}}
	sk := testsign.Key{Priv: k.priv.(*ecdsa.PrivateKey), PEM: k.pem}
	sum := sha256.Sum256([]byte("a manifest"))
	manifest := "sha256:" + hex.EncodeToString(sum[:])
	otherSum := sha256.Sum256([]byte("another manifest"))
	other := "sha256:" + hex.EncodeToString(otherSum[:])
	payload := testsign.SimpleSigningPayload(f, "registry.example.com/app", manifest)
	f.Add(sk.ManifestBundle(f, "registry.example.com/app", manifest), payload, base64.StdEncoding.EncodeToString(sk.SignRaw(f, payload)))
	f.Fuzz(func(t *testing.T, bundle, payload []byte, sig string) {
		verdict := func(err error) bool {
			return errors.Is(err, ErrBadSignature) || errors.Is(err, ErrUnknownKey)
		}
		if _, err := rule.VerifyManifestBundle(bundle, manifest); err == nil {
			if _, err := rule.VerifyManifestBundle(bundle, other); err == nil {
				t.Fatalf("bundle %q verifies for another manifest too", bundle)
			}
		} else if !verdict(err) {
			t.Fatalf("bundle: error is not a verdict: %v", err)
		}
		if _, err := rule.VerifySimpleSigning(payload, sig, manifest); err == nil {
			if _, err := rule.VerifySimpleSigning(payload, sig, other); err == nil {
				t.Fatalf("payload %q verifies for another manifest too", payload)
			}
		} else if !verdict(err) {
			t.Fatalf("simple signing: error is not a verdict: %v", err)
		}
	})
}
