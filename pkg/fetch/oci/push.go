package oci

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/pack"
)

// PushInput is what an artifact is made of.
type PushInput struct {
	Image       []byte     // the composefs image
	ImageDigest cfs.Digest // its fs-verity digest
	Objects     []cfs.Object
	// Open returns an object's content; Push checks it against its digest
	// as it packs it.
	Open func(o cfs.Object) (io.ReadCloser, error)
}

// PushOptions tune Push.
type PushOptions struct {
	// PackSize is the size new packs are cut at; 0 means 64 MiB.
	PackSize int64
	// Base is the artifact whose packs may be reused ("" = what the target
	// tag names now, if it is an artifact); in another repository of the
	// same registry its blobs are mounted rather than uploaded.
	Base *Reference
	// ReuseShare is the share of a base pack's object bytes that must be
	// live (needed by the new image) for it to be reused; 0 means 0.5.
	ReuseShare float64
	// Log receives one line per step; nil means none.
	Log func(format string, args ...any)
}

// PushResult tells what Push did.
type PushResult struct {
	Manifest      ocispec.Descriptor // the tagged manifest (or image index)
	Digest        cfs.Digest         // the composefs image's
	Packs         int
	ReusedPacks   int
	Uploaded      int   // blobs uploaded
	UploadedBytes int64 // their bytes
	Present       int   // blobs the repository had
	Mounted       int   // blobs mounted from the base repository
}

// Push uploads an artifact (docs/oci-artifact.md) to ref's tag: only the
// blobs the repository lacks (HEAD first; blobs of a base in another
// repository are mounted), reusing the packs of the base artifact whose
// objects are mostly still needed, so that a new version uploads mostly
// its new objects. Packs are written twice (once to learn their digest,
// once to upload them): no temporary copy is kept.
func Push(ctx context.Context, c *Client, in PushInput, opts PushOptions) (PushResult, error) {
	var res PushResult
	if opts.PackSize <= 0 {
		opts.PackSize = 64 << 20
	}
	if opts.ReuseShare <= 0 {
		opts.ReuseShare = 0.5
	}
	logf := opts.Log
	if logf == nil {
		logf = func(string, ...any) {}
	}
	objs := dedupObjects(in.Objects)
	need := make(map[cfs.Digest]cfs.Object, len(objs))
	for _, o := range objs {
		need[o.Digest] = o
	}

	// The base: its packs, and which of the objects each holds.
	var packs []ocispec.Descriptor
	placed := make(map[cfs.Digest]pack.Entry, len(objs))
	baseRepo := ""
	base, err := loadBase(ctx, c, opts.Base)
	if err != nil {
		return res, err
	}
	if base != nil {
		if opts.Base != nil && opts.Base.Repository != c.ref.Repository {
			baseRepo = opts.Base.Repository
		}
		live := make([]uint64, len(base.art.Packs))
		total := make([]uint64, len(base.art.Packs))
		for _, e := range base.idx.Entries {
			total[e.Pack] += e.Size
			if _, ok := need[e.Digest]; ok {
				live[e.Pack] += e.Size
			}
		}
		renum := make(map[int]int)
		for i, p := range base.art.Packs {
			if total[i] > 0 && float64(live[i]) >= opts.ReuseShare*float64(total[i]) {
				renum[i] = len(packs)
				packs = append(packs, p)
			}
		}
		for _, e := range base.idx.Entries {
			if n, ok := renum[e.Pack]; ok {
				if _, ok := need[e.Digest]; ok {
					e.Pack = n
					placed[e.Digest] = e
				}
			}
		}
		res.ReusedPacks = len(packs)
		logf("reusing %d of the %d packs of %s", len(packs), len(base.art.Packs), base.art.Manifest.Digest)
	}

	// New packs for the rest, in digest order, cut at PackSize.
	var rest []cfs.Object
	for _, o := range objs {
		if _, ok := placed[o.Digest]; !ok {
			rest = append(rest, o)
		}
	}
	type newPack struct {
		objs []cfs.Object
		desc ocispec.Descriptor
	}
	var fresh []*newPack
	for _, objs := range pack.Cut(rest, opts.PackSize) {
		fresh = append(fresh, &newPack{objs: objs})
	}
	for _, p := range fresh {
		h := sha256.New()
		offs, n, err := pack.Write(h, p.objs, in.Open)
		if err != nil {
			return res, err
		}
		p.desc = ocispec.Descriptor{MediaType: MediaTypePack, Digest: digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil)), Size: n}
		num := len(packs)
		packs = append(packs, p.desc)
		for i, o := range p.objs {
			placed[o.Digest] = pack.Entry{Digest: o.Digest, Size: o.Size, Pack: num, Offset: offs[i]}
		}
	}
	res.Packs = len(packs)
	for i := range packs {
		packs[i].Annotations = map[string]string{AnnotationTitle: fmt.Sprintf("pack-%04d.tar", i)}
	}

	idx := pack.Index{Packs: len(packs)}
	for _, e := range placed {
		idx.Entries = append(idx.Entries, e)
	}
	idxBytes, err := pack.EncodeIndex(idx)
	if err != nil {
		return res, err
	}
	imageDesc := ocispec.Descriptor{MediaType: MediaTypeImage, Digest: digest.FromBytes(in.Image), Size: int64(len(in.Image)),
		Annotations: map[string]string{AnnotationTitle: "image.cfs", AnnotationDigest: in.ImageDigest.String()}}
	indexDesc := ocispec.Descriptor{MediaType: MediaTypeIndex, Digest: digest.FromBytes(idxBytes), Size: int64(len(idxBytes)),
		Annotations: map[string]string{AnnotationTitle: "objects.idx"}}

	// Upload what the repository lacks.
	upload := func(desc ocispec.Descriptor, content func() (io.ReadCloser, error), mountable bool) error {
		ok, err := c.upstream.Exists(ctx, desc)
		if err != nil {
			return classify("checking blob", c.String()+"@"+desc.Digest.String(), err)
		}
		if ok {
			res.Present++
			return nil
		}
		if mountable && baseRepo != "" {
			err := c.upstream.Mount(ctx, desc, baseRepo, nil)
			if err == nil {
				res.Mounted++
				return nil
			}
			logf("mounting %s from %s failed (%v); uploading it", desc.Digest, baseRepo, err)
		}
		rc, err := content()
		if err != nil {
			return err
		}
		defer rc.Close()
		logf("uploading %s (%d bytes)", desc.Digest, desc.Size)
		if err := c.upstream.Push(ctx, desc, rc); err != nil {
			return classify("uploading blob", c.String()+"@"+desc.Digest.String(), err)
		}
		res.Uploaded++
		res.UploadedBytes += desc.Size
		return nil
	}
	fromBytes := func(b []byte) func() (io.ReadCloser, error) {
		return func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
	}
	if err := upload(emptyConfig, fromBytes(emptyConfig.Data), false); err != nil {
		return res, err
	}
	if err := upload(imageDesc, fromBytes(in.Image), false); err != nil {
		return res, err
	}
	if err := upload(indexDesc, fromBytes(idxBytes), false); err != nil {
		return res, err
	}
	isNew := make(map[digest.Digest]*newPack)
	for _, p := range fresh {
		isNew[p.desc.Digest] = p
	}
	for _, desc := range packs {
		p := isNew[desc.Digest]
		content := func() (io.ReadCloser, error) {
			if p == nil {
				return nil, fmt.Errorf("pack %s of the base is gone from the registry", desc.Digest)
			}
			return packReader(p.objs, in.Open), nil
		}
		if err := upload(desc, content, p == nil); err != nil {
			return res, err
		}
	}

	// The manifest (or the shards and their index), tagged last.
	layers := append([]ocispec.Descriptor{imageDesc, indexDesc}, packs...)
	ann := map[string]string{AnnotationDigest: in.ImageDigest.String()}
	var top []byte
	var topType string
	if len(layers) <= MaxManifestLayers {
		top, err = json.Marshal(ocispec.Manifest{Versioned: versioned, MediaType: ocispec.MediaTypeImageManifest,
			ArtifactType: ArtifactType, Config: emptyConfig, Layers: layers, Annotations: ann})
		topType = ocispec.MediaTypeImageManifest
	} else {
		ix := ocispec.Index{Versioned: versioned, MediaType: ocispec.MediaTypeImageIndex, ArtifactType: ArtifactType, Annotations: ann}
		for len(layers) > 0 {
			n := min(len(layers), MaxManifestLayers)
			b, err := json.Marshal(ocispec.Manifest{Versioned: versioned, MediaType: ocispec.MediaTypeImageManifest,
				ArtifactType: ShardArtifactType, Config: emptyConfig, Layers: layers[:n]})
			if err != nil {
				return res, err
			}
			layers = layers[n:]
			d := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: ShardArtifactType, Digest: digest.FromBytes(b), Size: int64(len(b))}
			if err := c.upstream.Manifests().Push(ctx, d, bytes.NewReader(b)); err != nil {
				return res, classify("uploading shard manifest", c.String()+"@"+d.Digest.String(), err)
			}
			ix.Manifests = append(ix.Manifests, d)
		}
		if len(ix.Manifests) > MaxShards {
			return res, fmt.Errorf("the artifact needs %d shards, more than %d: use larger packs", len(ix.Manifests), MaxShards)
		}
		top, err = json.Marshal(ix)
		topType = ocispec.MediaTypeImageIndex
	}
	if err != nil {
		return res, err
	}
	if len(top) > maxMetadataBytes {
		return res, fmt.Errorf("the manifest is %d bytes, more than %d", len(top), maxMetadataBytes)
	}
	desc := ocispec.Descriptor{MediaType: topType, Digest: digest.FromBytes(top), Size: int64(len(top)), ArtifactType: ArtifactType}
	if err := c.upstream.Manifests().PushReference(ctx, desc, bytes.NewReader(top), c.ref.Tag); err != nil {
		return res, classify("uploading manifest", c.ref.String(), err)
	}
	res.Manifest, res.Digest = desc, in.ImageDigest
	return res, nil
}

var versioned = specs.Versioned{SchemaVersion: 2}

type baseArtifact struct {
	art *Artifact
	idx *pack.Index
}

// loadBase resolves the artifact whose packs may be reused: ref, or the
// target tag's current artifact. A target tag that does not exist, or that
// names something else than an artifact, is no base.
func loadBase(ctx context.Context, c *Client, ref *Reference) (*baseArtifact, error) {
	bc, name := c, c.ref.Name()
	if ref != nil {
		if ref.Registry != c.ref.Registry {
			return nil, fmt.Errorf("base %s: must be in the registry %s", ref, c.ref.Registry)
		}
		var err error
		if bc, err = NewClient(*ref, c.opts); err != nil {
			return nil, err
		}
		name = ref.Name()
	}
	a, err := bc.ResolveArtifact(ctx, name)
	if err != nil {
		if ref == nil && (errors.Is(err, fetch.ErrNotFound) || errors.Is(err, fetch.ErrInvalidImage)) {
			return nil, nil
		}
		return nil, fmt.Errorf("base: %w", err)
	}
	b, err := bc.readBlob(ctx, a.Index, pack.MaxIndexBytes)
	if err != nil {
		return nil, fmt.Errorf("base: %w", err)
	}
	x, err := pack.DecodeIndex(b)
	if err != nil {
		return nil, fmt.Errorf("base %s: %w", a.Manifest.Digest, err)
	}
	return &baseArtifact{art: a, idx: x}, nil
}

// dedupObjects returns the distinct objects sorted by digest.
func dedupObjects(in []cfs.Object) []cfs.Object {
	seen := make(map[cfs.Digest]bool, len(in))
	var out []cfs.Object
	for _, o := range in {
		if !seen[o.Digest] {
			seen[o.Digest] = true
			out = append(out, cfs.Object{Digest: o.Digest, Size: o.Size, Path: o.Path})
		}
	}
	sort.Slice(out, func(i, j int) bool { return bytes.Compare(out[i].Digest[:], out[j].Digest[:]) < 0 })
	return out
}

// packReader streams a pack, written again from the objects.
func packReader(objs []cfs.Object, open func(cfs.Object) (io.ReadCloser, error)) io.ReadCloser {
	pr, pw := io.Pipe()
	go func() {
		_, _, err := pack.Write(pw, objs, open)
		pw.CloseWithError(err)
	}()
	return pr
}
