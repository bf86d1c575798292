package oci

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"strings"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// Limits on a container image from a registry.
const (
	maxConfigBytes = 8 << 20
	maxLayers      = 1000
)

// ImageSource reads one container image reference (docker://…) and
// converts it on the node: it implements fetch.ImageBuilder. Its objects
// come only from conversions (OpenObject fails).
type ImageSource struct {
	c        *Client
	ref      Reference
	platform ocispec.Platform
	limits   ConvertLimits
}

var _ fetch.ImageBuilder = (*ImageSource)(nil)

// NewImageSource makes the source of ref (docker://…) through c, picking
// the node's platform (linux and this process's architecture) from an
// image index.
func NewImageSource(c *Client, ref Reference, limits ConvertLimits) *ImageSource {
	return &ImageSource{c: c, ref: ref, platform: NodePlatform(), limits: limits}
}

// NodePlatform is the platform this process runs on.
func NodePlatform() ocispec.Platform {
	p := ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH}
	switch runtime.GOARCH {
	case "arm64":
		p.Variant = "v8"
	case "arm":
		p.Variant = "v7"
	}
	return p
}

// String names the reference.
func (s *ImageSource) String() string { return s.ref.String() }

// CloseIdleConnections closes the client's idle connections.
func (s *ImageSource) CloseIdleConnections() { s.c.CloseIdleConnections() }

// OpenImage fails: a container image is converted, not downloaded.
func (s *ImageSource) OpenImage(context.Context, fetch.ImageRef) (io.ReadCloser, int64, error) {
	return nil, 0, fmt.Errorf("%s is a container image: it is converted on the node, not downloaded", s)
}

// OpenObject fails: the objects of a converted image come from its layers.
func (s *ImageSource) OpenObject(_ context.Context, d cfs.Digest, _ uint64) (io.ReadCloser, error) {
	return nil, &fetch.SourceError{Op: "fetching object", URL: s.String(),
		Err: fmt.Errorf("object %s: the objects of a converted image are not fetched one by one; it is converted again when they are missing: %w", d, fetch.ErrNotFound)}
}

// imagePlan is a resolved container image.
type imagePlan struct {
	s        *ImageSource
	manifest ocispec.Descriptor
	layers   []ocispec.Descriptor
	diffIDs  []digest.Digest
	config   digest.Digest
	expect   cfs.Digest
}

// Resolved describes what a docker:// reference names now.
type Resolved struct {
	Manifest ocispec.Descriptor // the platform's manifest
	Config   digest.Digest
	Layers   []ocispec.Descriptor
}

// ResolveBuild resolves the reference (a tag or digest; an index gives
// the node's platform) to its manifest and config, with the source's
// credentials.
func (s *ImageSource) ResolveBuild(ctx context.Context, ref fetch.ImageRef) (fetch.BuildPlan, error) {
	return s.resolve(ctx)
}

// Resolve returns what the reference names now (for `oci digest`).
func (s *ImageSource) Resolve(ctx context.Context) (Resolved, error) {
	p, err := s.resolve(ctx)
	if err != nil {
		return Resolved{}, err
	}
	return Resolved{Manifest: p.manifest, Config: p.config, Layers: p.layers}, nil
}

func (s *ImageSource) resolve(ctx context.Context) (*imagePlan, error) {
	what := s.ref.String()
	desc, b, err := s.c.fetchManifest(ctx, s.ref.Name())
	if err != nil {
		return nil, err
	}
	bad := func(format string, args ...any) error {
		return &fetch.SourceError{Op: "reading image", URL: what, Err: fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), fetch.ErrInvalidImage)}
	}
	if mt := mediaTypeOf(b); mt == ocispec.MediaTypeImageIndex || mt == mediaTypeDockerManifestList {
		ix, err := parseIndex(b)
		if err != nil {
			return nil, bad("%v", err)
		}
		var found *ocispec.Descriptor
		var have []string
		for i := range ix.Manifests {
			m := &ix.Manifests[i]
			if m.Platform == nil {
				continue
			}
			have = append(have, platformString(*m.Platform))
			if found == nil && platformMatches(*m.Platform, s.platform) {
				found = m
			}
		}
		if found == nil {
			return nil, &fetch.SourceError{Op: "reading image", URL: what,
				Err: fmt.Errorf("no manifest for the node's platform %s (the image has: %s): %w", platformString(s.platform), strings.Join(have, ", "), fetch.ErrNotFound)}
		}
		if b, err = s.c.fetchChild(ctx, *found); err != nil {
			return nil, err
		}
		desc = *found
	}
	m, err := parseManifest(b)
	if err != nil {
		return nil, bad("%v", err)
	}
	if m.ArtifactType == ArtifactType {
		return nil, bad("this is a composefs artifact: name it with oci://")
	}
	if m.Config.MediaType != ocispec.MediaTypeImageConfig && m.Config.MediaType != mediaTypeDockerConfig {
		return nil, bad("config of media type %q is not an image config", truncate(m.Config.MediaType))
	}
	if len(m.Layers) > maxLayers {
		return nil, bad("%d layers, more than %d", len(m.Layers), maxLayers)
	}
	cb, err := s.c.readBlob(ctx, m.Config, maxConfigBytes)
	if err != nil {
		return nil, err
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(cb, &cfg); err != nil {
		return nil, bad("decoding the config: %v", err)
	}
	if cfg.OS != "" && cfg.OS != "linux" {
		return nil, &fetch.SourceError{Op: "reading image", URL: what, Err: fmt.Errorf("an image for %s, not linux: %w", cfg.OS, fetch.ErrNotFound)}
	}
	if len(cfg.RootFS.DiffIDs) != len(m.Layers) {
		return nil, bad("the config lists %d diff_ids for %d layers", len(cfg.RootFS.DiffIDs), len(m.Layers))
	}
	for i, l := range m.Layers {
		if _, err := decompressorFor(l.MediaType); err != nil {
			return nil, bad("layer %d: %v", i, err)
		}
		if d := cfg.RootFS.DiffIDs[i]; d.Validate() != nil || d.Algorithm() != digest.SHA256 {
			return nil, bad("diff_id %d is not a sha256 digest", i)
		}
	}
	p := &imagePlan{s: s, manifest: desc, layers: m.Layers, diffIDs: cfg.RootFS.DiffIDs, config: m.Config.Digest}
	if d, ok, err := parseDigestAnnotation(m.Annotations); err != nil {
		return nil, bad("%v", err)
	} else if ok {
		p.expect = d
	}
	return p, nil
}

func platformString(p ocispec.Platform) string {
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}

// platformMatches: same OS and architecture, and the same variant when the
// index names one (arm64 without variant is v8).
func platformMatches(have, want ocispec.Platform) bool {
	if have.OS != want.OS || have.Architecture != want.Architecture {
		return false
	}
	v := have.Variant
	if v == "" && have.Architecture == "arm64" {
		v = "v8"
	}
	return v == "" || v == want.Variant
}

// decompressorFor returns how a layer of media type mt is decompressed.
func decompressorFor(mt string) (func(io.Reader) (io.ReadCloser, error), error) {
	switch mt {
	case ocispec.MediaTypeImageLayer:
		return func(r io.Reader) (io.ReadCloser, error) { return io.NopCloser(r), nil }, nil
	case ocispec.MediaTypeImageLayerGzip, mediaTypeDockerLayer:
		// Multistream (the default) reads every gzip member. klauspost's
		// decoder: about half the CPU of the standard library's on a 939 MB
		// layer (4.9-5.8 s against 9.1-9.9 s), the largest single cost of a
		// conversion.
		return func(r io.Reader) (io.ReadCloser, error) { return gzip.NewReader(r) }, nil
	case ocispec.MediaTypeImageLayerZstd:
		return func(r io.Reader) (io.ReadCloser, error) {
			d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(1<<30))
			if err != nil {
				return nil, err
			}
			return d.IOReadCloser(), nil
		}, nil
	case mediaTypeDockerForeign, ocispec.MediaTypeImageLayerNonDistributable, ocispec.MediaTypeImageLayerNonDistributableGzip: //nolint:staticcheck // refused by name
		return nil, fmt.Errorf("foreign (non-distributable) layers are not supported")
	}
	return nil, fmt.Errorf("layer media type %q is not a tar layer", truncate(mt))
}

// Key is the build's cache key: the conversion's version, the config
// digest (which names the diff_ids, so the content) and the layers
// (their compressed digests: what proofs ask the registry for).
func (p *imagePlan) Key() string {
	h := sha256.New()
	for _, l := range p.layers {
		h.Write([]byte(l.Digest.String() + "\n"))
	}
	return fmt.Sprintf("docker/%s/%s/%x", ConvertVersion, p.config, h.Sum(nil))
}

// Expect is the digest the manifest's composefs annotation announces.
func (p *imagePlan) Expect() cfs.Digest { return p.expect }

// layerProof is what a proof asks a layer for: the block at Off, whose
// sha256 is Hash.
type layerProof struct {
	Digest digest.Digest `json:"digest"`
	Off    int64         `json:"off"`
	Len    int64         `json:"len"`
	Hash   []byte        `json:"hash"`
}

// Build fetches every layer, checks its digest and diff_id, and applies it;
// it returns the merged tree and the layers' proof blocks.
func (p *imagePlan) Build(ctx context.Context, sink fetch.BuildSink) (*cfs.Node, []byte, error) {
	tb := newTreeBuilder(p.s.limits, sink.Object)
	proofs := make([]layerProof, len(p.layers))
	var total int64
	for _, l := range p.layers {
		total += l.Size
	}
	sink.WillFetch(total)
	for i, l := range p.layers {
		lp, err := p.applyLayer(ctx, tb, i, l, sink)
		if err != nil {
			return nil, nil, err
		}
		proofs[i] = lp
	}
	root, noUsr, err := tb.finish()
	if err != nil {
		return nil, nil, err
	}
	if noUsr {
		sink.Logger().Info("The image has no /usr: its root gets mode 0755, owner 0:0 and mtime 0", "image", p.s.String())
	}
	b, err := json.Marshal(proofs)
	return root, b, err
}

func (p *imagePlan) applyLayer(ctx context.Context, tb *treeBuilder, i int, l ocispec.Descriptor, sink fetch.BuildSink) (layerProof, error) {
	what := fmt.Sprintf("%s layer %d (%s)", p.s, i, l.Digest)
	lp := layerProof{Digest: l.Digest, Off: sink.Challenge(l.Digest.String(), l.Size)}
	lp.Len = min(fetch.ProofBlock, l.Size-lp.Off)
	body, _, err := p.s.c.openStream(ctx, l, 0, -1)
	if err != nil {
		return lp, err
	}
	defer body.Close()
	compressed := p.s.c.verifying(ctx, body, l, what)
	grab := &blockGrabber{r: receivedReader{compressed, sink}, off: lp.Off, n: lp.Len}
	decomp, _ := decompressorFor(l.MediaType)
	dr, err := decomp(grab)
	if err != nil {
		return lp, p.s.c.mirrorFault(ctx, body, l.Digest, &fetch.SourceError{Op: "reading layer", URL: what, Err: fmt.Errorf("%w: %w", ErrBadLayer, err)})
	}
	defer dr.Close()
	diff := sha256.New()
	tee := io.TeeReader(dr, diff)
	// A layer from a mirror that fails (its digest, or its content before
	// the digest could be checked) is the mirror's fault: the next attempt
	// reads it from the registry.
	fail := func(err error) (layerProof, error) {
		return lp, p.s.c.mirrorFault(ctx, body, l.Digest, layerFailure(what, err))
	}
	if err := tb.applyLayer(ctx, i, tee); err != nil {
		return fail(err)
	}
	// The rest of the stream (tar padding) counts for the diff_id, and the
	// compressed digest is checked at its end.
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return fail(err)
	}
	if _, err := io.Copy(io.Discard, grab); err != nil {
		return fail(err)
	}
	if got := digest.NewDigestFromBytes(digest.SHA256, diff.Sum(nil)); got != p.diffIDs[i] {
		return lp, &fetch.SourceError{Op: "reading layer", URL: what,
			Err: fmt.Errorf("its content has diff_id %s, the config says %s: %w", got, p.diffIDs[i], fetch.ErrDigestMismatch)}
	}
	h := sha256.Sum256(grab.block.Bytes())
	lp.Hash = h[:]
	return lp, nil
}

// layerFailure keeps source errors (transient reads, digest mismatches)
// and makes the others (a bad tar, a refused entry) final.
func layerFailure(what string, err error) error {
	if _, ok := err.(*fetch.SourceError); ok {
		return err
	}
	return &fetch.SourceError{Op: "converting layer", URL: what, Err: fmt.Errorf("%w: %w", fetch.ErrInvalidImage, err)}
}

// receivedReader counts the bytes read in a build's progress.
type receivedReader struct {
	r    io.Reader
	sink fetch.BuildSink
}

func (r receivedReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.sink.Received(int64(n))
	return n, err
}

// blockGrabber keeps a copy of bytes [off, off+n) of what it reads.
type blockGrabber struct {
	r      io.Reader
	pos    int64
	off, n int64
	block  bytes.Buffer
}

func (g *blockGrabber) Read(p []byte) (int, error) {
	k, err := g.r.Read(p)
	start, end := g.pos, g.pos+int64(k)
	if lo, hi := max(start, g.off), min(end, g.off+g.n); lo < hi {
		g.block.Write(p[lo-start : hi-start])
	}
	g.pos = end
	return k, err
}

// Prove asks the registry, with the plan's credentials, for the block of
// each layer recorded when the image was converted, and compares it.
func (p *imagePlan) Prove(ctx context.Context, proof []byte, sink fetch.BuildSink) error {
	var lps []layerProof
	if err := json.Unmarshal(proof, &lps); err != nil || len(lps) != len(p.layers) {
		return fmt.Errorf("the conversion record of %s is unreadable", p.s)
	}
	for i, l := range p.layers {
		lp := lps[i]
		if lp.Digest != l.Digest || lp.Off < 0 || lp.Len < 0 || lp.Off+lp.Len > l.Size {
			return fmt.Errorf("layer %d: the conversion record names another layer", i)
		}
		// From the registry itself: a mirror serves anyone.
		body, _, err := p.s.c.openUpstreamBlob(ctx, l, lp.Off, lp.Len)
		if err != nil {
			return err
		}
		b, err := io.ReadAll(io.LimitReader(body, lp.Len+1))
		body.Close()
		if err != nil {
			return err
		}
		if h := sha256.Sum256(b); !bytes.Equal(h[:], lp.Hash) {
			return fmt.Errorf("layer %d (%s): bytes %d-%d differ from the converted layer's", i, l.Digest, lp.Off, lp.Off+lp.Len-1)
		}
	}
	return nil
}
