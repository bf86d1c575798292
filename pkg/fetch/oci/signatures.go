package oci

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/trust"
)

// Bounds on the signature material read for one manifest.
const (
	maxSignatureLayers = 32
	maxReferrers       = 32
)

var _ fetch.ManifestSigner = (*RepoSource)(nil)

// ResolveManifest returns the digest and the bytes of the manifest (or
// index) name names in the repository now: what cosign signs. A digest
// is fetched by that digest (and checked against it).
func (r *RepoSource) ResolveManifest(ctx context.Context, name string) (string, []byte, error) {
	if d, err := digest.Parse(name); err == nil && d.Algorithm() != digest.SHA256 {
		return "", nil, fmt.Errorf("manifest digest %s: only sha256 is supported", name)
	}
	desc, b, err := r.c.fetchManifest(ctx, name)
	if err != nil {
		return "", nil, err
	}
	return desc.Digest.String(), b, nil
}

// ManifestSignatures reads what cosign stores for the manifest
// manifestDigest in this repository: the layers of the signature manifest
// tagged sha256-<hex>.sig (cosign sign --key), and the sigstore bundles of
// the manifest's referrers (newer cosign; the referrers API, or its
// fallback tag sha256-<hex>). Only the registry itself is asked.
func (r *RepoSource) ManifestSignatures(ctx context.Context, manifestDigest string) ([]fetch.ManifestSignature, error) {
	d, err := digest.Parse(manifestDigest)
	if err != nil || d.Algorithm() != digest.SHA256 {
		return nil, fmt.Errorf("manifest digest %q is not a sha256 digest", manifestDigest)
	}
	out, err := r.cosignSignatures(ctx, d)
	if err != nil {
		return nil, err
	}
	bundles, err := r.bundleReferrers(ctx, d)
	if err != nil {
		return nil, err
	}
	return append(out, bundles...), nil
}

// cosignSignatures reads the signature manifest tagged sha256-<hex>.sig.
func (r *RepoSource) cosignSignatures(ctx context.Context, d digest.Digest) ([]fetch.ManifestSignature, error) {
	tag := trust.SignatureTag(d.String())
	what := r.c.String() + ":" + tag
	_, b, err := r.c.fetchManifest(ctx, tag)
	if errors.Is(err, fetch.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	m, err := parseManifest(b)
	if err != nil {
		return nil, &fetch.SourceError{Op: "reading signatures", URL: what, Err: fmt.Errorf("%w: %w", fetch.ErrInvalidImage, err)}
	}
	if len(m.Layers) > maxSignatureLayers {
		return nil, &fetch.SourceError{Op: "reading signatures", URL: what,
			Err: fmt.Errorf("%d signatures, more than %d: %w", len(m.Layers), maxSignatureLayers, fetch.ErrInvalidImage)}
	}
	var out []fetch.ManifestSignature
	for i, l := range m.Layers {
		if l.MediaType != trust.SimpleSigningMediaType {
			continue
		}
		s := fetch.ManifestSignature{Location: fmt.Sprintf("%s layer %d", what, i), Signature: l.Annotations[trust.SignatureAnnotation]}
		if l.Annotations[trust.CertificateAnnotation] != "" {
			s.Keyless = true
			out = append(out, s)
			continue
		}
		if s.Payload, err = r.c.readBlob(ctx, l, trust.MaxSignatureBytes); err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// bundleReferrers reads the sigstore bundles among the manifest's
// referrers.
func (r *RepoSource) bundleReferrers(ctx context.Context, d digest.Digest) ([]fetch.ManifestSignature, error) {
	what := r.c.String() + "@" + d.String() + " referrers"
	var found []ocispec.Descriptor
	// The subject's media type and size are not needed to list its
	// referrers.
	subject := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: d}
	err := r.c.upstream.Referrers(ctx, subject, "", func(refs []ocispec.Descriptor) error {
		for _, ref := range refs {
			// Some registries report the config's media type (the
			// empty one) instead of the manifest's artifactType: those
			// are read to tell.
			if strings.HasPrefix(ref.ArtifactType, trust.BundleArtifactPrefix) || ref.ArtifactType == "" || ref.ArtifactType == ocispec.MediaTypeEmptyJSON {
				found = append(found, ref)
			}
		}
		if len(found) > maxReferrers {
			return fmt.Errorf("more than %d candidate sigstore bundle referrers: %w", maxReferrers, fetch.ErrInvalidImage)
		}
		return nil
	})
	if err != nil {
		err = classify("listing referrers", what, err)
		if errors.Is(err, fetch.ErrNotFound) {
			return nil, nil
		}
		return nil, err
	}
	var out []fetch.ManifestSignature
	for _, ref := range found {
		b, err := r.c.fetchChild(ctx, ref)
		if err != nil {
			return nil, err
		}
		m, err := parseManifest(b)
		if err != nil {
			return nil, &fetch.SourceError{Op: "reading signatures", URL: what, Err: fmt.Errorf("%w: %w", fetch.ErrInvalidImage, err)}
		}
		if !strings.HasPrefix(m.ArtifactType, trust.BundleArtifactPrefix) {
			continue
		}
		for i, l := range m.Layers {
			if !strings.HasPrefix(l.MediaType, trust.BundleArtifactPrefix) {
				continue
			}
			bb, err := r.c.readBlob(ctx, l, trust.MaxSignatureBytes)
			if err != nil {
				return nil, err
			}
			out = append(out, fetch.ManifestSignature{Location: fmt.Sprintf("%s@%s layer %d", r.c.String(), ref.Digest, i), Bundle: bb})
		}
	}
	return out, nil
}
