package fetch

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// PublishImage builds a composefs image of the directory src into the HTTP
// repository directory repo: every external file is copied to
// repo/objects/xx/yyyy… unless the repository has it already (so publishing
// a new version adds only its new files), then the image is written
// atomically to repo/images/NAME and linked as repo/images/<digest> too, so
// that it can also be fetched by digest. Files are made world-readable for
// the web server. dirOpts.DigestStore is ignored. It returns the image
// digest.
func PublishImage(ctx context.Context, src, repo, name string, dirOpts cfs.DirOptions, opts cfs.WriteOptions) (cfs.Digest, error) {
	if err := ValidImageName(name); err != nil {
		return cfs.Digest{}, err
	}
	imgDir := filepath.Join(repo, "images")
	for _, d := range []string{filepath.Join(repo, "objects"), imgDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return cfs.Digest{}, fmt.Errorf("publishing into %s: %w", repo, err)
		}
	}
	dirOpts.DigestStore = filepath.Join(repo, "objects")
	root, err := cfs.BuildFromDir(ctx, src, dirOpts)
	if err != nil {
		return cfs.Digest{}, fmt.Errorf("publishing %s into %s: %w", src, repo, err)
	}
	path := filepath.Join(imgDir, name)
	d, err := cfs.WriteImageFile(path, root, opts)
	if err != nil {
		return cfs.Digest{}, fmt.Errorf("publishing image %s into %s: %w", name, repo, err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		return d, fmt.Errorf("publishing image %s: %w", name, err)
	}
	if byDigest := filepath.Join(imgDir, d.String()); name != d.String() {
		if err := os.Link(path, byDigest); err != nil && !errors.Is(err, fs.ErrExist) {
			return d, fmt.Errorf("publishing image %s by digest: %w", name, err)
		}
	}
	return d, nil
}
