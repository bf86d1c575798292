package oci

import (
	"context"
	"encoding/json"
	"fmt"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/pack"
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

// ArtifactImage returns the composefs image digest that b, the top-level
// manifest or image index of a composefs artifact (untrusted bytes), names
// in its annotation. Anything else (a container image's manifest, bytes
// that do not parse) is an error.
func ArtifactImage(b []byte) (cfs.Digest, error) {
	d, _, _, err := decodeArtifactTop(b)
	return d, err
}

// decodeArtifactTop decodes an artifact's top-level manifest or image
// index (untrusted bytes): the composefs image digest it names, and the
// index (of shards) or the manifest it is.
func decodeArtifactTop(b []byte) (cfs.Digest, *ocispec.Index, *ocispec.Manifest, error) {
	var ann map[string]string
	var ix *ocispec.Index
	var m *ocispec.Manifest
	var err error
	if mt := mediaTypeOf(b); mt == ocispec.MediaTypeImageIndex || mt == mediaTypeDockerManifestList {
		if ix, err = parseIndex(b); err != nil {
			return cfs.Digest{}, nil, nil, err
		}
		if ix.ArtifactType != ArtifactType {
			return cfs.Digest{}, nil, nil, notArtifact(ix.ArtifactType, "an image index")
		}
		ann = ix.Annotations
	} else {
		if m, err = parseManifest(b); err != nil {
			return cfs.Digest{}, nil, nil, err
		}
		if m.ArtifactType != ArtifactType {
			return cfs.Digest{}, nil, nil, notArtifact(m.ArtifactType, "a manifest")
		}
		ann = m.Annotations
	}
	d, ok, err := parseDigestAnnotation(ann)
	if err != nil {
		return cfs.Digest{}, nil, nil, err
	}
	if !ok {
		what := "manifest"
		if ix != nil {
			what = "image index"
		}
		return cfs.Digest{}, nil, nil, fmt.Errorf("the %s has no %s annotation", what, AnnotationDigest)
	}
	return d, ix, m, nil
}

// decodeArtifact decodes an artifact's top-level manifest or image index
// (untrusted bytes, of digest top.Digest); shard fetches a shard manifest
// (checked against its descriptor by the caller).
func decodeArtifact(top ocispec.Descriptor, b []byte, shard func(ocispec.Descriptor) ([]byte, error)) (*Artifact, error) {
	d, ix, m, err := decodeArtifactTop(b)
	if err != nil {
		return nil, err
	}
	a := &Artifact{Manifest: top, Digest: d}
	if ix == nil {
		a.Manifest.MediaType = ocispec.MediaTypeImageManifest
		if err := a.addLayers(m.Layers, true); err != nil {
			return nil, err
		}
		return a, a.check()
	}
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
		sm, err := parseManifest(sb)
		if err != nil {
			return nil, fmt.Errorf("shard %d: %w", i, err)
		}
		if sm.ArtifactType != ShardArtifactType {
			return nil, fmt.Errorf("shard %d has artifactType %q, want %s", i, sm.ArtifactType, ShardArtifactType)
		}
		if err := a.addLayers(sm.Layers, i == 0); err != nil {
			return nil, fmt.Errorf("shard %d: %w", i, err)
		}
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
	if a.Index.Size > pack.MaxIndexBytes {
		return fmt.Errorf("the object index is %d bytes, more than %d", a.Index.Size, pack.MaxIndexBytes)
	}
	if len(a.Packs) > pack.MaxPacks {
		return fmt.Errorf("%d packs, more than %d", len(a.Packs), pack.MaxPacks)
	}
	return nil
}
