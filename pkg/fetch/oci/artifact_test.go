package oci

import (
	"context"
	"errors"
	"testing"

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
