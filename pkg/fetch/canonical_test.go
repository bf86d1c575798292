package fetch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
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

// TestCorruptStoredImageFetchedAgain: a stored image whose file is no
// longer the image its name says (emptied or cut short by a lost write,
// overwritten) is found at its first use after a restart, quarantined and
// fetched again, not refused as an invalid image.
func TestCorruptStoredImageFetchedAgain(t *testing.T) {
	repo := t.TempDir()
	good := writeRepoImage(t, repo, "good.cfs", makeFiles("f", 5, 4, 20000))
	orig, err := os.ReadFile(filepath.Join(repo, "images", "good.cfs"))
	if err != nil {
		t.Fatal(err)
	}
	garbage := make([]byte, len(orig))
	for i := range garbage {
		garbage[i] = byte(i*7 + 3)
	}
	for _, c := range []struct {
		name string
		data []byte
	}{{"empty", nil}, {"cut short", orig[:len(orig)/2]}, {"overwritten", garbage}} {
		for _, allowNonCanonical := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/allowNonCanonical=%v", c.name, allowNonCanonical), func(t *testing.T) {
				ts := newTestServer(t, repo)
				src := newSource(t, ts.URL, HTTPOptions{})
				ctx := context.Background()
				root := t.TempDir()
				s := openStore(t, root, testOptions())
				if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "good.cfs", Digest: good}); err != nil {
					t.Fatal(err)
				}
				s.Close()
				if err := os.WriteFile(s.ImagePath(good), c.data, 0o644); err != nil {
					t.Fatal(err)
				}
				opts := testOptions()
				opts.AllowNonCanonicalImages = allowNonCanonical
				s = openStore(t, root, opts)
				defer s.Close()
				if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "good.cfs", Digest: good}); err != nil {
					t.Fatalf("first use of the corrupt stored image: %v, want it fetched again", err)
				}
				if got, err := os.ReadFile(s.ImagePath(good)); err != nil || !bytes.Equal(got, orig) {
					t.Errorf("the stored image is not the repository's again (%v)", err)
				}
				if n := ts.hits["/images/good.cfs"]; n != 2 {
					t.Errorf("the image was requested %d times, want 2", n)
				}
				q, _ := os.ReadDir(filepath.Join(root, quarantineDir))
				if len(q) != 1 {
					t.Errorf("%d files in quarantine/, want the corrupt image", len(q))
				}
				checkInvariant(t, root)
			})
		}
	}
}
