package oci

import (
	"context"
	"encoding/json"
	"fmt"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// ResolveArtifact fetches the manifest (or sharded image index) that name
// (a tag or "sha256:…") names in the repository and decodes the artifact
// layout. Only the registry itself is asked, with the client's
// credentials.
func (c *Client) ResolveArtifact(ctx context.Context, name string) (*Artifact, error) {
	desc, b, err := c.fetchManifest(ctx, name)
	if err != nil {
		return nil, err
	}
	a, err := decodeArtifact(desc, b, func(d ocispec.Descriptor) ([]byte, error) { return c.fetchChild(ctx, d) })
	if err != nil {
		return nil, &fetch.SourceError{Op: "reading artifact", URL: c.String() + ":" + name, Err: fmt.Errorf("%w: %w", fetch.ErrInvalidImage, err)}
	}
	return a, nil
}

// mediaTypeOf returns the media type a manifest or index says it has.
func mediaTypeOf(b []byte) string {
	var probe struct {
		MediaType string          `json:"mediaType"`
		Manifests json.RawMessage `json:"manifests"`
	}
	if json.Unmarshal(b, &probe) != nil {
		return ""
	}
	if probe.MediaType == "" && probe.Manifests != nil {
		return ocispec.MediaTypeImageIndex
	}
	return probe.MediaType
}

// decodeArtifact decodes an artifact's top-level manifest or image index
// (untrusted bytes, of digest top.Digest); shard fetches a shard manifest
// (checked against its descriptor by the caller).
func decodeArtifact(top ocispec.Descriptor, b []byte, shard func(ocispec.Descriptor) ([]byte, error)) (*Artifact, error) {
	a := &Artifact{Manifest: top}
	mt := mediaTypeOf(b)
	if mt == ocispec.MediaTypeImageIndex || mt == mediaTypeDockerManifestList {
		ix, err := parseIndex(b)
		if err != nil {
			return nil, err
		}
		if ix.ArtifactType != ArtifactType {
			return nil, notArtifact(ix.ArtifactType, "an image index")
		}
		d, ok, err := parseDigestAnnotation(ix.Annotations)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("the image index has no %s annotation", AnnotationDigest)
		}
		a.Digest = d
		if len(ix.Manifests) == 0 || len(ix.Manifests) > MaxShards {
			return nil, fmt.Errorf("the image index lists %d shards, want 1 to %d", len(ix.Manifests), MaxShards)
		}
		a.Manifest.MediaType = ocispec.MediaTypeImageIndex
		for i, sd := range ix.Manifests {
			if sd.MediaType != ocispec.MediaTypeImageManifest {
				return nil, fmt.Errorf("shard %d has media type %q, want %s", i, sd.MediaType, ocispec.MediaTypeImageManifest)
			}
			sb, err := shard(sd)
			if err != nil {
				return nil, fmt.Errorf("shard %d: %w", i, err)
			}
			m, err := parseManifest(sb)
			if err != nil {
				return nil, fmt.Errorf("shard %d: %w", i, err)
			}
			if m.ArtifactType != ShardArtifactType {
				return nil, fmt.Errorf("shard %d has artifactType %q, want %s", i, m.ArtifactType, ShardArtifactType)
			}
			if err := a.addLayers(m.Layers, i == 0); err != nil {
				return nil, fmt.Errorf("shard %d: %w", i, err)
			}
		}
		return a, a.check()
	}
	m, err := parseManifest(b)
	if err != nil {
		return nil, err
	}
	if m.ArtifactType != ArtifactType {
		return nil, notArtifact(m.ArtifactType, "a manifest")
	}
	d, ok, err := parseDigestAnnotation(m.Annotations)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("the manifest has no %s annotation", AnnotationDigest)
	}
	a.Digest = d
	a.Manifest.MediaType = ocispec.MediaTypeImageManifest
	if err := a.addLayers(m.Layers, true); err != nil {
		return nil, err
	}
	return a, a.check()
}

func notArtifact(at, what string) error {
	if at == "" {
		return fmt.Errorf("%s without artifactType is not a composefs artifact (a container image is read with docker://)", what)
	}
	return fmt.Errorf("%s of artifactType %q is not a composefs artifact (want %s)", what, truncate(at), ArtifactType)
}

// addLayers takes a (shard) manifest's layers: the image and index first
// when first is set, then packs.
func (a *Artifact) addLayers(layers []ocispec.Descriptor, first bool) error {
	if len(layers) > MaxManifestLayers {
		return fmt.Errorf("%d layers, more than %d", len(layers), MaxManifestLayers)
	}
	if first {
		if len(layers) < 2 || layers[0].MediaType != MediaTypeImage || layers[1].MediaType != MediaTypeIndex {
			return fmt.Errorf("the first layers must be the image (%s) and the object index (%s)", MediaTypeImage, MediaTypeIndex)
		}
		a.Image, a.Index = layers[0], layers[1]
		layers = layers[2:]
	}
	for i, l := range layers {
		if l.MediaType != MediaTypePack {
			return fmt.Errorf("layer %d has media type %q, want %s (a pack)", i, truncate(l.MediaType), MediaTypePack)
		}
		a.Packs = append(a.Packs, l)
	}
	return nil
}

func (a *Artifact) check() error {
	if a.Index.Size > MaxIndexBytes {
		return fmt.Errorf("the object index is %d bytes, more than %d", a.Index.Size, MaxIndexBytes)
	}
	if len(a.Packs) > maxPacks {
		return fmt.Errorf("%d packs, more than %d", len(a.Packs), maxPacks)
	}
	return nil
}
