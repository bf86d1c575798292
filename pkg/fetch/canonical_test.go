package fetch

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// nonCanonicalRepo publishes an image and a copy of it with a block of
// zeros after the end the superblock declares: the reader accepts both
// (same tree), only the first is canonical.
func nonCanonicalRepo(t *testing.T) (repo string, good, bad cfs.Digest) {
	t.Helper()
	repo = t.TempDir()
	good = writeRepoImage(t, repo, "good.cfs", makeFiles("f", 5, 4, 20000))
	b, err := os.ReadFile(filepath.Join(repo, "images", "good.cfs"))
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, make([]byte, 4096)...)
	if err := os.WriteFile(filepath.Join(repo, "images", "bad.cfs"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return repo, good, cfs.VerityDigestOf(b)
}

// TestNonCanonicalImageRefused: an image that is not its tree's canonical
// image is refused before it is stored (a final error naming the reason)
// unless AllowNonCanonicalImages; one stored while that was allowed is
// refused at its first use once it is not, and stays in the store.
func TestNonCanonicalImageRefused(t *testing.T) {
	repo, good, bad := nonCanonicalRepo(t)
	ts := newTestServer(t, repo)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "good.cfs", Digest: good}); err != nil {
		t.Fatalf("canonical image: %v", err)
	}
	_, err := s.EnsureImage(ctx, src, ImageRef{Name: "bad.cfs", Digest: bad})
	if !errors.Is(err, ErrInvalidImage) || !errors.Is(err, cfs.ErrNotCanonical) || IsTransient(err) {
		t.Fatalf("non-canonical image: %v, want a final ErrInvalidImage wrapping cfs.ErrNotCanonical", err)
	}
	t.Logf("refused: %v", err)
	if s.HasImage(bad) {
		t.Error("the refused image was stored")
	}
	if n := ts.hits["/images/bad.cfs"]; n != 1 {
		t.Errorf("the refused image was requested %d times, want 1 (no retry of a final error)", n)
	}
	checkInvariant(t, root)
	s.Close()

	opts := testOptions()
	opts.AllowNonCanonicalImages = true
	s = openStore(t, root, opts)
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "bad.cfs", Digest: bad}); err != nil {
		t.Fatalf("AllowNonCanonicalImages: %v", err)
	}
	s.Close()

	s = openStore(t, root, testOptions())
	if _, err := s.EnsureImage(ctx, src, ImageRef{Digest: bad}); !errors.Is(err, cfs.ErrNotCanonical) {
		t.Fatalf("a stored non-canonical image at its first use: %v, want cfs.ErrNotCanonical", err)
	}
	if !s.HasImage(bad) {
		t.Error("the stored non-canonical image was removed (refusing it is policy: it is intact)")
	}
	if _, err := s.EnsureImage(ctx, src, ImageRef{Digest: good}); err != nil {
		t.Fatalf("a stored canonical image after a restart: %v", err)
	}
	if !s.isCanonical(good) || s.isCanonical(bad) {
		t.Error("the verdicts are not remembered")
	}
}
