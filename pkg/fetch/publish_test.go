package fetch

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// TestPublishThenPull publishes two versions of a tree sharing most files
// and pulls both: the second publish and the second pull add only the new
// files.
func TestPublishThenPull(t *testing.T) {
	src := t.TempDir()
	for i := range 20 {
		os.WriteFile(filepath.Join(src, fmt.Sprintf("f%02d", i)), content(uint64(500+i), 1000+i*700), 0o644)
	}
	os.WriteFile(filepath.Join(src, "small"), []byte("inline"), 0o644)
	repo := t.TempDir()
	ctx := context.Background()
	d1, err := PublishImage(ctx, src, repo, "app-1.cfs", cfs.DirOptions{}, cfs.DefaultWriteOptions())
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(src, "f00"), content(999, 3000), 0o644)
	os.WriteFile(filepath.Join(src, "f01"), content(998, 3000), 0o644)
	d2, err := PublishImage(ctx, src, repo, "app-2.cfs", cfs.DirOptions{}, cfs.DefaultWriteOptions())
	if err != nil {
		t.Fatal(err)
	}
	u, _ := DiskUsage(ctx, repo)
	if u.Objects.Files != 22 {
		t.Errorf("repository holds %d objects, want 22", u.Objects.Files)
	}
	if fi, err := os.Stat(filepath.Join(repo, "images", "app-2.cfs")); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("image not world-readable: %v %v", fi, err)
	}
	ts := newTestServer(t, repo)
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	hsrc := newSource(t, ts.URL, HTTPOptions{})
	for i, d := range []cfs.Digest{d1, d2} {
		// By digest alone: the repository has images/<digest> too.
		got, err := s.EnsureImage(ctx, hsrc, ImageRef{Digest: d})
		if err != nil || got != d {
			t.Fatal(got, err)
		}
		st, err := s.EnsureObjects(ctx, hsrc, d)
		if err != nil {
			t.Fatal(err)
		}
		if want := []int{20, 2}[i]; st.Fetched != want {
			t.Errorf("pull %d fetched %d objects, want %d", i+1, st.Fetched, want)
		}
	}
	checkInvariant(t, root)
}
