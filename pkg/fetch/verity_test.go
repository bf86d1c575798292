package fetch

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// The tests here need a filesystem with fs-verity under the test's temp
// directory: they skip elsewhere, and test/e2e/vm runs them on Debian's
// 6.12 kernel with TMPDIR on an ext4 disk made with -O verity.

func needVerityStore(t *testing.T, opts Options) (*Store, string) {
	t.Helper()
	root := t.TempDir()
	s := openStore(t, root, opts)
	if !s.VerityEnabled() {
		t.Skip("no fs-verity under the test directory (test/e2e/vm runs this on a kernel with it)")
	}
	return s, root
}

// measure returns the kernel's fs-verity digest of path.
func measure(t *testing.T, path string) (cfs.Digest, error) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return cfs.MeasureVerity(f)
}

// TestKernelVerityStoredFiles: every object and image a pull stores has
// fs-verity, measured by the kernel equal to its name.
func TestKernelVerityStoredFiles(t *testing.T) {
	opts := testOptions()
	opts.MinFreeSpace = -1
	s, _ := needVerityStore(t, opts)
	for i, named := range []bool{false, true} {
		s.opts.NamedTempFiles = named
		repo := t.TempDir()
		files := makeFiles("f", uint64(7+i), 12, 100000)
		d := writeRepoImage(t, repo, "img.cfs", files)
		src := newSource(t, newTestServer(t, repo).URL, HTTPOptions{})
		ctx := context.Background()
		if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "img.cfs", Digest: d}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.EnsureObjects(ctx, src, d); err != nil {
			t.Fatal(err)
		}
		if got, err := measure(t, s.ImagePath(d)); err != nil || got != d {
			t.Errorf("image: the kernel measures %v, %v; want %s", got, err, d)
		}
		for _, f := range files {
			want := cfs.VerityDigestOf(f.data)
			if got, err := measure(t, s.objectPath(want)); err != nil || got != want {
				t.Errorf("object %s (named temp files %v): the kernel measures %v, %v", want, named, got, err)
			}
		}
	}
}

// TestKernelVerityMeasuredBeforeLink: a temporary file whose content the
// kernel measures as other than the name it is to get is refused before
// it is linked into place (both ways of writing temporary files).
func TestKernelVerityMeasuredBeforeLink(t *testing.T) {
	s, root := needVerityStore(t, testOptions())
	data := content(3, 50000)
	wrong := cfs.VerityDigestOf(content(4, 50000))
	for _, named := range []bool{false, true} {
		tf, err := createTemp(filepath.Join(root, tmpDir), "object-*", named)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tf.Write(data); err != nil {
			t.Fatal(err)
		}
		err = s.prepareTemp(tf, wrong)
		if !errors.Is(err, ErrDigestMismatch) {
			t.Errorf("named %v: prepareTemp with another digest: %v, want ErrDigestMismatch", named, err)
		}
		tf.discard()
		if err := s.prepareTemp(mustTemp(t, root, named, data), cfs.VerityDigestOf(data)); err != nil {
			t.Errorf("named %v: prepareTemp with the right digest: %v", named, err)
		}
	}
	f, err := os.CreateTemp(filepath.Join(root, tmpDir), "image-*")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := s.finishFile(f, wrong); !errors.Is(err, ErrDigestMismatch) {
		t.Errorf("finishFile with another digest: %v, want ErrDigestMismatch", err)
	}
}

func mustTemp(t *testing.T, root string, named bool, data []byte) *tempFile {
	t.Helper()
	tf, err := createTemp(filepath.Join(root, tmpDir), "object-*", named)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tf.discard)
	if _, err := tf.Write(data); err != nil {
		t.Fatal(err)
	}
	return tf
}

// TestKernelVerityAddedLater: files stored while fs-verity was off get it
// when next used; one whose content is not its name (changed in place,
// same size) is quarantined and fetched again.
func TestKernelVerityAddedLater(t *testing.T) {
	opts := testOptions()
	opts.MinFreeSpace = -1
	probe, root := needVerityStore(t, opts)
	probe.Close()
	opts.DisableVerity = true
	s := openStore(t, root, opts)
	repo := t.TempDir()
	files := makeFiles("f", 21, 6, 60000)
	d := writeRepoImage(t, repo, "img.cfs", files)
	src := newSource(t, newTestServer(t, repo).URL, HTTPOptions{})
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "img.cfs", Digest: d}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.EnsureObjects(ctx, src, d); err != nil {
		t.Fatal(err)
	}
	victim := s.objectPath(cfs.VerityDigestOf(files[0].data))
	if _, err := measure(t, victim); !errors.Is(err, cfs.ErrVerityNotEnabled) {
		t.Fatalf("stored with fs-verity off: %v, want ErrVerityNotEnabled", err)
	}
	bad := append([]byte(nil), files[0].data...)
	bad[0] ^= 1
	if err := os.WriteFile(victim, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	s.Close()

	opts.DisableVerity = false
	s = openStore(t, root, opts)
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "img.cfs", Digest: d}); err != nil {
		t.Fatal(err)
	}
	st, err := s.EnsureObjects(ctx, src, d)
	if err != nil {
		t.Fatal(err)
	}
	if st.Fetched != 1 {
		t.Errorf("fetched %d objects, want the 1 whose content was changed", st.Fetched)
	}
	if got, err := measure(t, s.ImagePath(d)); err != nil || got != d {
		t.Errorf("image: the kernel measures %v, %v; want %s", got, err, d)
	}
	for _, f := range files {
		want := cfs.VerityDigestOf(f.data)
		if got, err := measure(t, s.objectPath(want)); err != nil || got != want {
			t.Errorf("object %s: the kernel measures %v, %v", want, got, err)
		}
	}
	if q, _ := os.ReadDir(filepath.Join(root, quarantineDir)); len(q) != 1 {
		t.Errorf("%d files in quarantine/, want the changed object", len(q))
	}
}
