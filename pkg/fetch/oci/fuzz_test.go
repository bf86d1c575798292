package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// FuzzDecodeArtifact: manifests and image indexes of any bytes decode or
// fail cleanly; what decodes has an image, an index and sha256 packs.
func FuzzDecodeArtifact(f *testing.F) {
	layer := func(mt string) ocispec.Descriptor {
		return ocispec.Descriptor{MediaType: mt, Digest: digest.FromString(mt), Size: 10}
	}
	m := ocispec.Manifest{Versioned: versioned, MediaType: ocispec.MediaTypeImageManifest, ArtifactType: ArtifactType, Config: emptyConfig,
		Layers:      []ocispec.Descriptor{layer(MediaTypeImage), layer(MediaTypeIndex), layer(MediaTypePack)},
		Annotations: map[string]string{AnnotationDigest: cfs.Digest{1}.String()}}
	mb, _ := json.Marshal(m)
	f.Add(mb, mb)
	shard := m
	shard.ArtifactType, shard.Annotations = ShardArtifactType, nil
	sb, _ := json.Marshal(shard)
	ix := ocispec.Index{Versioned: versioned, MediaType: ocispec.MediaTypeImageIndex, ArtifactType: ArtifactType,
		Manifests:   []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(sb), Size: int64(len(sb))}},
		Annotations: m.Annotations}
	ib, _ := json.Marshal(ix)
	f.Add(ib, sb)
	f.Fuzz(func(t *testing.T, top, child []byte) {
		a, err := decodeArtifact(ocispec.Descriptor{Digest: digest.FromBytes(top)}, top, func(ocispec.Descriptor) ([]byte, error) { return child, nil })
		if err != nil {
			return
		}
		if a.Image.MediaType != MediaTypeImage || a.Index.MediaType != MediaTypeIndex || a.Digest.IsZero() {
			t.Fatalf("decoded an artifact without image, index or digest: %+v", a)
		}
		for _, p := range a.Packs {
			if p.MediaType != MediaTypePack || p.Digest.Validate() != nil || p.Size < 0 {
				t.Fatalf("bad pack descriptor accepted: %+v", p)
			}
		}
	})
}

// FuzzApplyLayer: any tar stream is applied or refused with an error; a
// tree that results is writable by the composefs writer, and no entry
// escapes it.
func FuzzApplyLayer(f *testing.F) {
	seed := func(ents []tarEntry) []byte { return layerTar(f, ents) }
	f.Add(seed([]tarEntry{dirE("usr/"), fileE("usr/a", "hello"), linkE("usr/b", "usr/a"), symlinkE("usr/c", "a")}))
	f.Add(seed([]tarEntry{dirE("d/"), fileE("d/x", string(make([]byte, 100))), fileE("d/.wh..wh..opq", ""), fileE("d/y", "y"), fileE(".wh.d", "")}))
	f.Add(seed([]tarEntry{dirE("run/"), fileE("run/x", "1"), dirE("usr/"), linkE("l", "run/x")}))
	f.Fuzz(func(t *testing.T, b []byte) {
		tb := newTreeBuilder(ConvertLimits{MaxEntries: 1000, MaxBytes: 1 << 20, MaxFileSize: 1 << 20},
			func(_ context.Context, r io.Reader, size int64) (cfs.Digest, error) {
				h := cfs.NewVerityHash()
				n, err := io.Copy(h, io.LimitReader(r, size))
				if err == nil && n != size {
					err = io.ErrUnexpectedEOF
				}
				return h.Digest(), err
			})
		if err := tb.applyLayer(context.Background(), 0, bytes.NewReader(b)); err != nil {
			if !errors.Is(err, ErrBadLayer) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, tar.ErrHeader) {
				// Every refusal says what is wrong with the layer.
				if !bytes.Contains([]byte(err.Error()), []byte("layer 0")) {
					t.Fatalf("unlabelled error: %v", err)
				}
			}
			return
		}
		root, _, err := tb.finish()
		if err != nil {
			t.Fatalf("finish: %v", err)
		}
		if _, err := cfs.WriteImage(io.Discard, root, cfs.WriteOptions{MinVersion: 1, MaxVersion: 1}); err != nil {
			t.Fatalf("the converted tree cannot be written: %v", err)
		}
	})
}
