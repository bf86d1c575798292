// Package oci reads composefs images from OCI registries: composefs
// artifacts (the layout of docs/oci-artifact.md: the EROFS image, an object
// index and tar "pack" layers holding the objects, fetched by range) and
// plain container images (converted on the node). It also pushes artifacts.
//
// The registry protocol is oras-go's; this package adds the layout, the
// conversion rules and what the node store needs (package fetch).
package oci

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/pack"
)

// Media types and annotations of the artifact layout, version 1
// (docs/oci-artifact.md).
const (
	// ArtifactType is the artifactType of a composefs artifact's top-level
	// manifest (or image index, when sharded).
	ArtifactType = "application/vnd.csi-composefs.image.v1"
	// ShardArtifactType is the artifactType of the manifests an image index
	// lists when the artifact is sharded.
	ShardArtifactType = "application/vnd.csi-composefs.shard.v1"
	// MediaTypeImage is the layer holding the EROFS (composefs) image.
	MediaTypeImage = "application/vnd.csi-composefs.erofs.v1"
	// MediaTypeIndex is the layer holding the object index (index.go).
	MediaTypeIndex = "application/vnd.csi-composefs.object-index.v1"
	// MediaTypePack is a pack layer: a plain, uncompressed tar of
	// objects/xx/yyyy… entries.
	MediaTypePack = ocispec.MediaTypeImageLayer

	// AnnotationDigest carries the composefs image's fs-verity digest
	// (lowercase hex), the key composefs-rs's sealing spec uses for the
	// merged image.
	AnnotationDigest = "composefs.merged.erofs.v1.fsverity-sha256-12"
	// AnnotationTitle names a layer's file (oras pull writes it there).
	AnnotationTitle = ocispec.AnnotationTitle

	// MaxManifestLayers bounds the layers of one manifest we write (and
	// accept): registries limit them (ECR documents 127).
	MaxManifestLayers = 100
	// MaxShards bounds the manifests of a sharded artifact.
	MaxShards = 1000
	// maxMetadataBytes bounds a manifest or image index body: what
	// distribution accepts.
	maxMetadataBytes = 4 << 20
)

// emptyConfig is the OCI empty descriptor ("{}"), the config of artifacts.
var emptyConfig = ocispec.DescriptorEmptyJSON

// Artifact is a resolved composefs artifact: where its image, index and
// packs are.
type Artifact struct {
	// Manifest is the descriptor of the top-level manifest or index.
	Manifest ocispec.Descriptor
	// Digest is the composefs image digest the annotation announces.
	Digest cfs.Digest
	Image  ocispec.Descriptor
	Index  ocispec.Descriptor
	// Packs in index order: the object index's pack numbers.
	Packs []ocispec.Descriptor
}

// parseManifest decodes an image manifest of untrusted bytes.
func parseManifest(b []byte) (*ocispec.Manifest, error) {
	if len(b) > maxMetadataBytes {
		return nil, fmt.Errorf("manifest is %d bytes, more than %d", len(b), maxMetadataBytes)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("decoding manifest: %w", err)
	}
	if m.SchemaVersion != 2 {
		return nil, fmt.Errorf("manifest schemaVersion %d, want 2", m.SchemaVersion)
	}
	if m.MediaType != "" && m.MediaType != ocispec.MediaTypeImageManifest && m.MediaType != mediaTypeDockerManifest {
		return nil, fmt.Errorf("manifest mediaType %q is not an image manifest", m.MediaType)
	}
	if err := checkDescriptor(m.Config, "config"); err != nil {
		return nil, err
	}
	for i, l := range m.Layers {
		if err := checkDescriptor(l, fmt.Sprintf("layer %d", i)); err != nil {
			return nil, err
		}
	}
	return &m, nil
}

// parseIndex decodes an image index of untrusted bytes.
func parseIndex(b []byte) (*ocispec.Index, error) {
	if len(b) > maxMetadataBytes {
		return nil, fmt.Errorf("image index is %d bytes, more than %d", len(b), maxMetadataBytes)
	}
	var ix ocispec.Index
	if err := json.Unmarshal(b, &ix); err != nil {
		return nil, fmt.Errorf("decoding image index: %w", err)
	}
	if ix.SchemaVersion != 2 {
		return nil, fmt.Errorf("image index schemaVersion %d, want 2", ix.SchemaVersion)
	}
	for i, d := range ix.Manifests {
		if err := checkDescriptor(d, fmt.Sprintf("manifest %d", i)); err != nil {
			return nil, err
		}
	}
	return &ix, nil
}

// checkDescriptor refuses descriptors whose digest is not a valid sha256
// (what this package fetches and verifies) or whose size is negative.
func checkDescriptor(d ocispec.Descriptor, what string) error {
	// Validate first: Algorithm panics on a digest without a colon.
	if err := d.Digest.Validate(); err != nil {
		return fmt.Errorf("%s: digest %q: %w", what, truncate(d.Digest.String()), err)
	}
	if d.Digest.Algorithm() != digest.SHA256 {
		return fmt.Errorf("%s: digest %q is not sha256", what, truncate(d.Digest.String()))
	}
	if d.Size < 0 {
		return fmt.Errorf("%s: negative size %d", what, d.Size)
	}
	return nil
}

// parseDigestAnnotation reads the composefs digest annotation.
func parseDigestAnnotation(ann map[string]string) (cfs.Digest, bool, error) {
	v, ok := ann[AnnotationDigest]
	if !ok {
		return cfs.Digest{}, false, nil
	}
	if len(v) != 2*cfs.DigestSize || strings.ToLower(v) != v {
		return cfs.Digest{}, true, fmt.Errorf("annotation %s: want %d lowercase hex characters", AnnotationDigest, 2*cfs.DigestSize)
	}
	d, err := cfs.ParseDigest(v)
	if err != nil {
		return cfs.Digest{}, true, fmt.Errorf("annotation %s: %w", AnnotationDigest, err)
	}
	if d.IsZero() {
		// No content has it, and everywhere else it means "no digest".
		return cfs.Digest{}, true, fmt.Errorf("annotation %s: the all-zero digest names no image", AnnotationDigest)
	}
	return d, true, nil
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}

// Docker's media types, which plain images still use.
const (
	mediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	mediaTypeDockerConfig       = "application/vnd.docker.container.image.v1+json"
	mediaTypeDockerLayer        = "application/vnd.docker.image.rootfs.diff.tar.gzip"
	mediaTypeDockerForeign      = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
)

// manifestMediaTypes are the manifests this package asks registries for.
var manifestMediaTypes = []string{
	ocispec.MediaTypeImageManifest,
	ocispec.MediaTypeImageIndex,
	mediaTypeDockerManifest,
	mediaTypeDockerManifestList,
}

// An index names at most as many packs as an artifact has layers for.
var _ [pack.MaxPacks - MaxShards*MaxManifestLayers]struct{}
var _ [MaxShards*MaxManifestLayers - pack.MaxPacks]struct{}
