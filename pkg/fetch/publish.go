package fetch

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// ErrImageExists: the repository has another image of that name.
var ErrImageExists = errors.New("the repository has another image of that name")

// PublishOption tunes PublishImage.
type PublishOption func(*publishOptions)

type publishOptions struct {
	keepExisting bool
	packs        *PackOptions
}

// KeepExisting makes PublishImage refuse to replace an image of the same
// name with other content (ErrImageExists); the same content is fine.
func KeepExisting() PublishOption { return func(o *publishOptions) { o.keepExisting = true } }

// PublishImage builds a composefs image of the directory src into the HTTP
// repository directory repo: every external file is copied to
// repo/objects/xx/yyyy… unless the repository has it already (so publishing
// a new version adds only its new files), then the image is written
// atomically to repo/images/NAME and linked as repo/images/<digest> too, so
// that it can also be fetched by digest. WithPacks also packs its small
// objects (publishPacks). Files are made world-readable for
// the web server. dirOpts.DigestStore is ignored. It returns the image
// digest.
func PublishImage(ctx context.Context, src, repo, name string, dirOpts cfs.DirOptions, opts cfs.WriteOptions, popts ...PublishOption) (cfs.Digest, error) {
	var po publishOptions
	for _, o := range popts {
		o(&po)
	}
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
	// Written beside, then renamed or linked into place.
	tf, err := os.CreateTemp(imgDir, "."+name+".new-*")
	if err != nil {
		return cfs.Digest{}, fmt.Errorf("publishing image %s into %s: %w", name, repo, err)
	}
	tmp := tf.Name()
	tf.Close()
	defer os.Remove(tmp)
	d, err := cfs.WriteImageFile(tmp, root, opts)
	if err != nil {
		return cfs.Digest{}, fmt.Errorf("publishing image %s into %s: %w", name, repo, err)
	}
	if err := os.Chmod(tmp, 0o644); err != nil {
		return d, fmt.Errorf("publishing image %s: %w", name, err)
	}
	if old, err := fileDigest(path); po.packs != nil && (!po.keepExisting || err != nil || old == d) {
		// Before the image: a node that finds the image finds its packs.
		st, err := publishPacks(ctx, repo, d, treeObjects(root), *po.packs)
		if err != nil {
			return d, fmt.Errorf("publishing the packs of image %s into %s: %w", name, repo, err)
		}
		klog.FromContext(ctx).V(1).Info("Packs written", "image", name, "packedObjects", st.Objects,
			"reusedPacks", st.ReusedPacks, "newPacks", st.NewPacks, "newBytes", st.NewBytes)
	}
	if err := placeImage(tmp, path, d, po.keepExisting); err != nil {
		return d, fmt.Errorf("publishing image %s into %s: %w", name, repo, err)
	}
	if byDigest := filepath.Join(imgDir, d.String()); name != d.String() {
		if err := os.Link(path, byDigest); err != nil && !errors.Is(err, fs.ErrExist) {
			return d, fmt.Errorf("publishing image %s by digest: %w", name, err)
		}
	}
	return d, nil
}

// placeImage moves the image tmp (digest d) to path; with keep, an image
// of other content already at path stays and ErrImageExists is returned.
func placeImage(tmp, path string, d cfs.Digest, keep bool) error {
	if !keep {
		return os.Rename(tmp, path)
	}
	for {
		old, err := fileDigest(path)
		switch {
		case err == nil && old == d:
			return nil // the same image: nothing to do
		case err == nil:
			return fmt.Errorf("images/%s has digest %s, the new image %s: %w", filepath.Base(path), old, d, ErrImageExists)
		case !errors.Is(err, fs.ErrNotExist):
			return err
		}
		// Link fails if another publisher got there first: compare again.
		if err := os.Link(tmp, path); !errors.Is(err, fs.ErrExist) {
			return err
		}
	}
}

func fileDigest(path string) (cfs.Digest, error) {
	f, err := os.Open(path)
	if err != nil {
		return cfs.Digest{}, err
	}
	defer f.Close()
	d, _, err := cfs.VerityDigestReader(f)
	return d, err
}
