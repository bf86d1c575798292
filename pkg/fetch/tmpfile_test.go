package fetch

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestTempFileKinds pulls through anonymous (O_TMPFILE) temporary files and
// through the named fallback: both leave only verified objects and an
// empty tmp/, and publishing an object whose name exists already succeeds.
func TestTempFileKinds(t *testing.T) {
	for _, named := range []bool{false, true} {
		name := map[bool]string{false: "anonymous", true: "named"}[named]
		t.Run(name, func(t *testing.T) {
			repo := t.TempDir()
			files := makeFiles("f", 5, 30, 300000)
			d := writeRepoImage(t, repo, "img.cfs", files)
			ts := newTestServer(t, repo)
			root := t.TempDir()
			opts := testOptions()
			opts.NamedTempFiles = named
			s := openStore(t, root, opts)
			src := newSource(t, ts.URL, HTTPOptions{})
			ctx := context.Background()
			if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "img.cfs"}); err != nil {
				t.Fatal(err)
			}
			st, err := s.EnsureObjects(ctx, src, d)
			if err != nil {
				t.Fatal(err)
			}
			if st.Fetched == 0 {
				t.Fatalf("nothing fetched: %+v", st)
			}
			checkInvariant(t, root)
			if !hasObjects(t, root, files) {
				t.Fatal("objects missing")
			}

			// Another writer stored the object first: publishing ours is
			// as good, and leaves the stored one in place.
			objs, err := s.Objects(ctx, d)
			if err != nil {
				t.Fatal(err)
			}
			o := objs[0]
			final := s.objectPath(o.Digest)
			data, err := os.ReadFile(final)
			if err != nil {
				t.Fatal(err)
			}
			tf, err := createTemp(filepath.Join(root, tmpDir), "object-*", named)
			if err != nil {
				t.Fatal(err)
			}
			if tf.anon == named {
				t.Fatalf("anonymous = %v", tf.anon)
			}
			if _, err := tf.Write(data); err != nil {
				t.Fatal(err)
			}
			if err := s.prepareTemp(tf, o.Digest); err != nil {
				t.Fatal(err)
			}
			if err := tf.publish(final); err != nil {
				t.Fatal(err)
			}
			checkInvariant(t, root)
		})
	}
}
