// Package testsign helps tests sign images the way cosign does, with
// sigstore's libraries: sign-blob signatures over image files, the
// signature manifest cosign sign --key stores under the tag
// sha256-<hex>.sig, and the sigstore bundle referrer newer cosign writes.
package testsign

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/sigstore/sigstore/pkg/signature/payload"
	"oras.land/oras-go/v2/registry/remote"
)

// Key is an ECDSA P-256 key pair (cosign generate-key-pair's kind).
type Key struct {
	Priv *ecdsa.PrivateKey
	// PEM is the public key as cosign.pub holds it.
	PEM string
}

// NewKey makes a key pair.
func NewKey(t testing.TB) Key {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	return Key{Priv: priv, PEM: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))}
}

// hint is the key hint cosign writes: base64 of the SHA-256 of the DER key.
func (k Key) hint() []byte {
	der, _ := x509.MarshalPKIXPublicKey(k.Priv.Public())
	sum := sha256.Sum256(der)
	return []byte(base64.StdEncoding.EncodeToString(sum[:]))
}

// SignRaw signs msg as cosign does with the key (SHA-256, ASN.1).
func (k Key) SignRaw(t testing.TB, msg []byte) []byte {
	t.Helper()
	sv, err := signature.LoadDefaultSignerVerifier(k.Priv)
	if err != nil {
		t.Fatal(err)
	}
	sig, err := sv.SignMessage(bytes.NewReader(msg))
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

// SignBlob is what cosign sign-blob --key --output-signature writes for
// msg: the base64 signature.
func (k Key) SignBlob(t testing.TB, msg []byte) []byte {
	return []byte(base64.StdEncoding.EncodeToString(k.SignRaw(t, msg)))
}

// Policy is a trust policy file with one rule for prefix.
func Policy(prefix string, require bool, keys ...Key) string {
	var b strings.Builder
	fmt.Fprintf(&b, "sources:\n- prefix: %s\n  requireSignature: %v\n  keys:", prefix, require)
	if len(keys) == 0 {
		b.WriteString(" []\n")
	}
	b.WriteString("\n")
	for i, k := range keys {
		fmt.Fprintf(&b, "  - name: key-%d\n    publicKey: |\n", i)
		for _, l := range strings.Split(strings.TrimSpace(k.PEM), "\n") {
			fmt.Fprintf(&b, "      %s\n", l)
		}
	}
	return b.String()
}

// ManifestBundle is the sigstore bundle cosign (v3, or v2 with
// --new-bundle-format) makes signing the manifest of digest
// manifestDigest in repository repo: a DSSE envelope of an in-toto
// statement with the manifest as subject.
func (k Key) ManifestBundle(t testing.TB, repo, manifestDigest string) []byte {
	t.Helper()
	d := digest.Digest(manifestDigest)
	stmt, err := json.Marshal(map[string]any{
		"_type":         "https://in-toto.io/Statement/v1",
		"subject":       []any{map[string]any{"name": repo, "digest": map[string]string{"sha256": d.Encoded()}}},
		"predicateType": "https://sigstore.dev/cosign/sign/v1",
		"predicate":     map[string]any{},
	})
	if err != nil {
		t.Fatal(err)
	}
	const payloadType = "application/vnd.in-toto+json"
	pae := fmt.Sprintf("DSSEv1 %d %s %d %s", len(payloadType), payloadType, len(stmt), stmt)
	j, err := json.Marshal(map[string]any{
		"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
		"verificationMaterial": map[string]any{
			"publicKey": map[string]string{"hint": string(k.hint())}, "tlogEntries": []any{},
		},
		"dsseEnvelope": map[string]any{
			"payload": base64.StdEncoding.EncodeToString(stmt), "payloadType": payloadType,
			"signatures": []any{map[string]string{"sig": base64.StdEncoding.EncodeToString(k.SignRaw(t, []byte(pae)))}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// Repository reaches repository repo of a registry at host (plain HTTP).
func Repository(t testing.TB, host, repo string) *remote.Repository {
	t.Helper()
	r, err := remote.NewRepository(host + "/" + repo)
	if err != nil {
		t.Fatal(err)
	}
	r.PlainHTTP = true
	return r
}

// Manifest returns the descriptor of what reference (a tag) names.
func Manifest(t testing.TB, r *remote.Repository, reference string) ocispec.Descriptor {
	t.Helper()
	d, err := r.Resolve(context.Background(), reference)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func pushBlob(t testing.TB, r *remote.Repository, mediaType string, b []byte) ocispec.Descriptor {
	t.Helper()
	d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if err := r.Push(context.Background(), d, bytes.NewReader(b)); err != nil {
		t.Fatal(err)
	}
	return d
}

func pushManifest(t testing.TB, r *remote.Repository, m any, tag string) ocispec.Descriptor {
	t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	d := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if tag != "" {
		err = r.PushReference(context.Background(), d, bytes.NewReader(b), tag)
	} else {
		err = r.Push(context.Background(), d, bytes.NewReader(b))
	}
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// SimpleSigningPayload is the payload cosign sign signs for the manifest
// of digest manifestDigest in repository repo (host/path).
func SimpleSigningPayload(t testing.TB, repo, manifestDigest string) []byte {
	t.Helper()
	ref, err := name.NewDigest(repo+"@"+manifestDigest, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(payload.Cosign{Image: ref})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// SimpleSigning is one signature layer: a payload and its signature.
type SimpleSigning struct {
	Payload   []byte
	Signature string // base64
}

// CosignSign stores signatures as cosign sign --key does: a manifest
// tagged sha256-<hex>.sig (of subject) with one simple signing layer per
// signature, annotated with its base64 signature.
func CosignSign(t testing.TB, r *remote.Repository, subject string, sigs ...SimpleSigning) {
	t.Helper()
	var layers []ocispec.Descriptor
	var diffIDs []string
	for _, s := range sigs {
		l := pushBlob(t, r, "application/vnd.dev.cosign.simplesigning.v1+json", s.Payload)
		l.Annotations = map[string]string{"dev.cosignproject.cosign/signature": s.Signature}
		layers = append(layers, l)
		diffIDs = append(diffIDs, l.Digest.String())
	}
	cfg, err := json.Marshal(map[string]any{
		"architecture": "", "created": "0001-01-01T00:00:00Z", "os": "",
		"history": []any{map[string]string{"created": "0001-01-01T00:00:00Z"}},
		"rootfs":  map[string]any{"type": "layers", "diff_ids": diffIDs}, "config": map[string]any{},
	})
	if err != nil {
		t.Fatal(err)
	}
	c := pushBlob(t, r, ocispec.MediaTypeImageConfig, cfg)
	pushManifest(t, r, ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, Config: c, Layers: layers},
		strings.Replace(subject, ":", "-", 1)+".sig")
}

// Sign signs subject (a manifest digest in r, repository repo = host/path)
// with k and stores it as cosign sign --key does.
func (k Key) Sign(t testing.TB, r *remote.Repository, repo, subject string) {
	t.Helper()
	p := SimpleSigningPayload(t, repo, subject)
	CosignSign(t, r, subject, SimpleSigning{Payload: p, Signature: base64.StdEncoding.EncodeToString(k.SignRaw(t, p))})
}

// AttachBundle stores bundle as the sigstore bundle referrer of subject,
// as cosign does with the new bundle format.
func AttachBundle(t testing.TB, r *remote.Repository, subject ocispec.Descriptor, bundle []byte) {
	t.Helper()
	l := pushBlob(t, r, "application/vnd.dev.sigstore.bundle.v0.3+json", bundle)
	empty := pushBlob(t, r, ocispec.MediaTypeEmptyJSON, []byte("{}"))
	empty.Data = []byte("{}")
	s := subject
	s.Annotations, s.Platform, s.ArtifactType = nil, nil, ""
	pushManifest(t, r, ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		ArtifactType: "application/vnd.dev.sigstore.bundle.v0.3+json", Config: empty, Layers: []ocispec.Descriptor{l}, Subject: &s,
		Annotations: map[string]string{"dev.sigstore.bundle.content": "dsse-envelope", "dev.sigstore.bundle.predicateType": "https://sigstore.dev/cosign/sign/v1"}}, "")
}
