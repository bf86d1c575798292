// Package testrepo helps tests build HTTP repositories of composefs images.
package testrepo

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// Publish writes files (relative path → content) into a fresh directory and
// publishes it as image name into the repository directory repo, with all
// mtimes 0 so equal trees give equal images. It returns the image digest.
func Publish(t testing.TB, repo, name string, files map[string]string) cfs.Digest {
	t.Helper()
	src := t.TempDir()
	for p, data := range files {
		full := filepath.Join(src, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	d, err := fetch.PublishImage(context.Background(), src, repo, name, cfs.DirOptions{UseEpoch: true}, cfs.DefaultWriteOptions())
	if err != nil {
		t.Fatal(err)
	}
	return d
}
