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
