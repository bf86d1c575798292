package oci

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// sizes of the test trees: mostly 20 to 100 KiB, some inline (<= 64 B).
func testSize(i int) int {
	if i%10 == 3 {
		return 10 + i%50
	}
	return 20<<10 + (i*7919)%(80<<10)
}

func seeds(n int, base uint64) []uint64 {
	s := make([]uint64, n)
	for i := range s {
		s[i] = base + uint64(i)
	}
	return s
}

func pull(t *testing.T, s *fetch.Store, src *ArtifactSource, name string) (fetch.Stats, error) {
	t.Helper()
	ctx := context.Background()
	d, err := s.EnsureImage(ctx, src, fetch.ImageRef{Name: name})
	if err != nil {
		return fetch.Stats{}, err
	}
	return s.EnsureObjects(ctx, src, d)
}

func TestArtifactPushPull(t *testing.T) {
	reg := newTestRegistry(t)
	dir := t.TempDir()
	writeTree(t, dir, seeds(120, 1), testSize)
	ref := reg.ref(t, "team/app:v1")
	c := reg.client(t, ref)
	res := pushDir(t, c, dir, PushOptions{PackSize: 1 << 20})
	if res.Packs < 3 {
		t.Fatalf("%d packs, want several of at most 1 MiB", res.Packs)
	}
	s := openStore(t)
	reg.reset()
	st, err := pull(t, s, NewArtifactSource(c, ref), "v1")
	if err != nil {
		t.Fatal(err)
	}
	d, _ := s.EnsureImage(context.Background(), NewArtifactSource(c, ref), fetch.ImageRef{Name: "v1"})
	if d != res.Digest {
		t.Fatalf("pulled image %s, pushed %s", d, res.Digest)
	}
	checkObjects(t, s, d, dir)
	_, gets, _ := reg.counts()
	t.Logf("cold pull: %d objects in %d blob GETs, %d bytes of objects, %d read past", st.Fetched, gets, st.FetchedBytes, st.RunOverheadBytes)
	if st.Fetched == 0 || gets > res.Packs*2+4 {
		t.Fatalf("cold pull: %d objects fetched with %d blob GETs for %d packs", st.Fetched, gets, res.Packs)
	}
}

func TestArtifactNotAnArtifact(t *testing.T) {
	reg := newTestRegistry(t)
	ref := reg.ref(t, "team/app:nope")
	c := reg.client(t, ref)
	s := openStore(t)
	_, err := pull(t, s, NewArtifactSource(c, ref), "nope")
	if !errors.Is(err, fetch.ErrNotFound) {
		t.Fatalf("missing tag: %v, want ErrNotFound", err)
	}
}

// Two tags sharing 90 % of their objects: pulling the second into a store
// that has the first fetches little more than the new objects, the image
// and the index, counted at the registry.
func TestArtifactSecondVersionFetchesOnlyNewObjects(t *testing.T) {
	for _, tc := range []struct {
		name        string
		ignoreRange bool
	}{{"ranges", false}, {"server ignores Range", true}} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newTestRegistry(t)
			const n = 200
			v1, v2 := t.TempDir(), t.TempDir()
			s1 := seeds(n, 1)
			s2 := append([]uint64(nil), s1...)
			for i := 0; i < n; i += 10 { // 10 % new content
				s2[i] = 100000 + uint64(i)
			}
			writeTree(t, v1, s1, testSize)
			writeTree(t, v2, s2, testSize)
			ref1, ref2 := reg.ref(t, "team/app:v1"), reg.ref(t, "team/app:v2")
			c1, c2 := reg.client(t, ref1), reg.client(t, ref2)
			pushDir(t, c1, v1, PushOptions{PackSize: 2 << 20})
			base := ref1
			res2 := pushDir(t, c2, v2, PushOptions{PackSize: 2 << 20, Base: &base})
			if res2.ReusedPacks == 0 {
				t.Fatalf("the second push reused no pack of the first")
			}
			s := openStore(t)
			if _, err := pull(t, s, NewArtifactSource(c1, ref1), "v1"); err != nil {
				t.Fatal(err)
			}
			reg.IgnoreRange.Store(tc.ignoreRange)
			reg.reset()
			src := NewArtifactSource(c2, ref2)
			st, err := pull(t, s, src, "v2")
			if err != nil {
				t.Fatal(err)
			}
			checkObjects(t, s, res2.Digest, v2)
			reqs, gets, got := reg.counts()
			r, _ := src.resolve(context.Background())
			need := int64(st.FetchedBytes) + r.a.Image.Size + r.a.Index.Size
			t.Logf("second version: %d new objects (%d bytes) + image %d + index %d; registry served %d blob bytes in %d blob GETs (%d requests)",
				st.Fetched, st.FetchedBytes, r.a.Image.Size, r.a.Index.Size, got, gets, reqs)
			if st.Present < n*8/10 {
				t.Fatalf("only %d objects were present", st.Present)
			}
			if tc.ignoreRange {
				// Whole packs, but only the packs holding new objects.
				var packBytes int64
				for _, p := range r.a.Packs {
					packBytes += p.Size
				}
				if got >= packBytes {
					t.Fatalf("without Range the registry served %d bytes, all the packs are %d", got, packBytes)
				}
				return
			}
			if float64(got) > 1.05*float64(need) {
				t.Fatalf("registry served %d blob bytes, more than 1.05 × %d", got, need)
			}
		})
	}
}

// A pack whose bytes were changed at the registry: the object fails its
// fs-verity check, finally, and nothing of it is stored.
func TestArtifactTamperedPack(t *testing.T) {
	reg := newTestRegistry(t)
	dir := t.TempDir()
	writeTree(t, dir, seeds(20, 1), testSize)
	ref := reg.ref(t, "team/app:v1")
	c := reg.client(t, ref)
	res := pushDir(t, c, dir, PushOptions{})
	r, err := c.ResolveArtifact(context.Background(), "v1")
	if err != nil {
		t.Fatal(err)
	}
	pack := r.Packs[0].Digest.String()
	tamper := func(path string, body []byte) []byte {
		if strings.HasSuffix(path, pack) && len(body) > 4096 {
			body = append([]byte(nil), body...)
			body[len(body)/2] ^= 1
		}
		return body
	}
	reg.Tamper.Store(&tamper)
	s := openStore(t)
	_, err = pull(t, s, NewArtifactSource(c, ref), "v1")
	if !errors.Is(err, fetch.ErrDigestMismatch) || fetch.IsTransient(err) {
		t.Fatalf("got %v, want a final ErrDigestMismatch", err)
	}
	objs, _ := s.Objects(context.Background(), res.Digest)
	n := 0
	for _, o := range objs {
		if _, err := os.Stat(filepath.Join(s.ObjectsDir(), o.Digest.ObjectPath())); err == nil {
			n++
		}
	}
	if n == len(objs) {
		t.Fatalf("every object was stored despite the tampered pack")
	}
	_ = walkFiles(s.Root()+"/tmp", func(p string) { t.Errorf("left in tmp/: %s", p) })
}

// Manifests beyond the layout's limits are refused before anything is
// fetched.
func TestArtifactManifestLimits(t *testing.T) {
	layer := func(mt string, i int) ocispec.Descriptor {
		return ocispec.Descriptor{MediaType: mt, Digest: digest.FromString(fmt.Sprint(mt, i)), Size: 10}
	}
	m := ocispec.Manifest{Versioned: versioned, MediaType: ocispec.MediaTypeImageManifest, ArtifactType: ArtifactType, Config: emptyConfig,
		Layers: []ocispec.Descriptor{layer(MediaTypeImage, 0), layer(MediaTypeIndex, 0)}, Annotations: map[string]string{AnnotationDigest: cfs.Digest{1}.String()}}
	for i := 0; i < MaxManifestLayers; i++ {
		m.Layers = append(m.Layers, layer(MediaTypePack, i))
	}
	b, _ := json.Marshal(m)
	if _, err := decodeArtifact(ocispec.Descriptor{}, b, nil); err == nil || !strings.Contains(err.Error(), "layers") {
		t.Fatalf("a manifest of %d layers: %v, want refused", len(m.Layers), err)
	}
	big := append(b[:len(b)-1:len(b)-1], []byte(`,"x":"`+strings.Repeat("a", maxMetadataBytes)+`"}`)...)
	if _, err := decodeArtifact(ocispec.Descriptor{}, big, nil); err == nil {
		t.Fatalf("a manifest of %d bytes was accepted", len(big))
	}
	// And from a registry: the node refuses to read past 4 MiB.
	reg := newTestRegistry(t)
	ref := reg.ref(t, "team/big:v1")
	c := reg.client(t, ref)
	req, _ := http.NewRequest(http.MethodPut, "http://"+reg.host+"/v2/team/big/manifests/v1", bytes.NewReader(big))
	req.Header.Set("Content-Type", ocispec.MediaTypeImageManifest)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode/100 != 2 {
		t.Fatalf("putting the manifest: %v %v", err, resp)
	}
	resp.Body.Close()
	if _, err := c.ResolveArtifact(context.Background(), "v1"); err == nil || fetch.IsTransient(err) {
		t.Fatalf("a %d-byte manifest: %v, want a final refusal", len(big), err)
	}
}

// A pull reads at most maxConcurrentRuns runs at once, however many runs
// its packs make.
func TestArtifactConcurrentRuns(t *testing.T) {
	reg := newTestRegistry(t)
	dir := t.TempDir()
	writeTree(t, dir, seeds(120, 1), testSize)
	ref := reg.ref(t, "team/app:v1")
	c := reg.client(t, ref)
	res := pushDir(t, c, dir, PushOptions{PackSize: 64 << 10})
	if res.Packs < 3*maxConcurrentRuns {
		t.Fatalf("%d packs, want more than %d", res.Packs, 3*maxConcurrentRuns)
	}
	var inFlight, peak atomic.Int32
	f := func(_ http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Range") != "" {
			n := inFlight.Add(1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
			time.Sleep(10 * time.Millisecond)
			inFlight.Add(-1)
		}
		return false
	}
	reg.Intercept.Store(&f)
	if _, err := pull(t, openStore(t), NewArtifactSource(c, ref), "v1"); err != nil {
		t.Fatal(err)
	}
	if p := peak.Load(); p > maxConcurrentRuns || p < 2 {
		t.Fatalf("%d range requests at once, want 2 to %d", p, maxConcurrentRuns)
	}
}
