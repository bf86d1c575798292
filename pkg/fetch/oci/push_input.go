package oci

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// InputFromDir builds the composefs image of dir (as `image build` does)
// and reads the objects from dir's files themselves, without copying them.
func InputFromDir(ctx context.Context, dir string, dirOpts cfs.DirOptions, wopts cfs.WriteOptions) (PushInput, error) {
	dirOpts.DigestStore = ""
	root, err := cfs.BuildFromDir(ctx, dir, dirOpts)
	if err != nil {
		return PushInput{}, err
	}
	var img bytes.Buffer
	d, err := cfs.WriteImage(&img, root, wopts)
	if err != nil {
		return PushInput{}, err
	}
	paths := make(map[cfs.Digest]string)
	objs := root.Objects(func(n *cfs.Node) {
		paths[*n.Digest] = filepath.Join(dir, filepath.FromSlash(n.Path()))
	})
	return PushInput{Image: img.Bytes(), ImageDigest: d, Objects: objs, Open: func(o cfs.Object) (io.ReadCloser, error) {
		return os.Open(paths[o.Digest])
	}}, nil
}

// InputFromImage reads a composefs image file whose objects are in
// objectsDir (xx/yyyy…).
func InputFromImage(path, objectsDir string) (PushInput, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return PushInput{}, err
	}
	img, err := cfs.Open(bytes.NewReader(b), int64(len(b)), cfs.OpenOptions{})
	if err != nil {
		return PushInput{}, fmt.Errorf("%s: %w", path, err)
	}
	objs := img.Objects()
	for _, o := range objs {
		if o.Digest.IsZero() {
			return PushInput{}, fmt.Errorf("%s: object %q is not named by a digest", path, o.Path)
		}
		fi, err := os.Stat(filepath.Join(objectsDir, o.Digest.ObjectPath()))
		if err != nil {
			return PushInput{}, fmt.Errorf("object %s: %w", o.Digest, err)
		}
		if uint64(fi.Size()) != o.Size {
			return PushInput{}, fmt.Errorf("object %s: %d bytes in %s, the image records %d", o.Digest, fi.Size(), objectsDir, o.Size)
		}
	}
	h := cfs.NewVerityHash()
	h.Write(b)
	return PushInput{Image: b, ImageDigest: h.Digest(), Objects: objs, Open: func(o cfs.Object) (io.ReadCloser, error) {
		return os.Open(filepath.Join(objectsDir, o.Digest.ObjectPath()))
	}}, nil
}
