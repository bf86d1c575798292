package fetch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// writeRepoImageSizes is writeRepoImage with the size the image records for
// each file given by size (a hostile image may lie); objects are not
// written.
func writeRepoImageSizes(t testing.TB, repo, name string, files []testFile, size func(i int) int) cfs.Digest {
	t.Helper()
	var dump strings.Builder
	dump.WriteString("/ 0 40755 2 0 0 0 1700000000.0 - - -\n")
	for i, f := range files {
		d := cfs.VerityDigestOf(f.data)
		fmt.Fprintf(&dump, "/%s %d 100644 1 0 0 0 1700000000.0 %s - %s\n", f.name, size(i), d.ObjectPath(), d)
	}
	root, err := cfs.ParseDump(strings.NewReader(dump.String()), cfs.DumpOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	d, err := cfs.WriteImage(&buf, root, cfs.DefaultWriteOptions())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(repo, "images", name), buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return d
}

// A hostile image naming the digest of a stored object with another size
// must fail on its own and leave the object (used by mounted volumes) alone.
func TestHostileSizeDoesNotEvictObjects(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 7, 8, 20000)
	legit := writeRepoImage(t, repo, "legit.cfs", files)
	const victim = 3
	hostile := writeRepoImageSizes(t, repo, "hostile.cfs", files, func(i int) int {
		if i == victim {
			return len(files[i].data) + 1
		}
		return len(files[i].data)
	})
	ts := newTestServer(t, repo)
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()

	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "legit.cfs"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.EnsureObjects(ctx, src, legit); err != nil {
		t.Fatal(err)
	}
	s.Pin(legit) // a mounted volume
	if got, err := s.EnsureImage(ctx, src, ImageRef{Name: "hostile.cfs"}); err != nil || got != hostile {
		t.Fatal(got, err)
	}
	_, err := s.EnsureObjects(ctx, src, hostile)
	if !errors.Is(err, ErrSizeMismatch) || !errors.Is(err, ErrInvalidImage) {
		t.Fatalf("hostile image: %v, want a size mismatch", err)
	}
	vd := cfs.VerityDigestOf(files[victim].data)
	if !strings.Contains(err.Error(), vd.String()) || !strings.Contains(err.Error(), hostile.String()) {
		t.Errorf("error names neither the object nor the image: %v", err)
	}
	if !hasObjects(t, root, files) {
		t.Fatal("an object of the legit image left objects/")
	}
	if n := s.Counters().Quarantined; n != 0 {
		t.Errorf("%d files quarantined", n)
	}

	// A second mount of the legit image fetches nothing.
	hits := len(ts.objectHits())
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "legit.cfs", Digest: legit}); err != nil {
		t.Fatal(err)
	}
	st, err := s.EnsureObjects(ctx, src, legit)
	if err != nil {
		t.Fatal(err)
	}
	if st.Fetched != 0 || st.Present != len(files) {
		t.Fatalf("re-pull stats %+v", st)
	}
	total := 0
	for _, n := range ts.objectHits() {
		total += n
	}
	if len(ts.objectHits()) != hits || total != len(files) {
		t.Errorf("objects requested again: %v", ts.objectHits())
	}
	checkInvariant(t, root)
}
