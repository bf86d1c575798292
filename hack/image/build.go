package main

import (
	"archive/tar"
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/crypto/x509roots/fallback/bundle"
)

// Paths inside the image. The Dockerfile puts the same files at the same
// paths.
const (
	binaryPath = "usr/bin/csi-composefs"
	caPath     = "etc/ssl/certs/ca-certificates.crt" // where Go's crypto/x509 looks first on Linux
)

// Spec is what one image build takes.
type Spec struct {
	// Binaries maps a platform ("linux/amd64") to the static binary built
	// for it.
	Binaries map[string]string
	// Ref is the image name and tag (repository:tag).
	Ref string
	// Version and Revision go into the image's OCI labels.
	Version, Revision string
	// Created is the time stamped on every file and in the config
	// (SOURCE_DATE_EPOCH), so that the same inputs give the same bytes.
	Created time.Time
	// Out is the output directory: oci/ (an OCI image layout holding the
	// multi-arch index) and one docker-save tarball per platform.
	Out string
}

// Result names what a build wrote.
type Result struct {
	Index     v1.Hash            // digest of the multi-arch image index
	Manifests map[string]v1.Hash // platform → image manifest digest
	Tarballs  map[string]string  // platform → docker-save tarball path
	Layout    string             // OCI image layout directory
}

// CABundle returns the PEM bundle of the root certificates that
// golang.org/x/crypto/x509roots/fallback ships (Mozilla's set, pinned by
// go.sum, so the image does not depend on the build machine's CA package).
// Roots that carry a constraint (a distrust-after date) are left out: a PEM
// file cannot say it.
func CABundle() ([]byte, error) {
	type root struct {
		subject string
		der     []byte
	}
	var roots []root
	for r := range bundle.Roots() {
		if r.Constraint != nil {
			continue
		}
		c, err := x509.ParseCertificate(r.Certificate)
		if err != nil {
			return nil, fmt.Errorf("root certificate: %w", err)
		}
		roots = append(roots, root{c.Subject.String(), r.Certificate})
	}
	sort.SliceStable(roots, func(i, j int) bool { return roots[i].subject < roots[j].subject })
	var b bytes.Buffer
	for _, r := range roots {
		fmt.Fprintf(&b, "# %s\n", r.subject)
		if err := pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: r.der}); err != nil {
			return nil, err
		}
	}
	return b.Bytes(), nil
}

// rootfsTar is the image's only layer: a few directories, the CA bundle and
// the binary, owned by 0:0, stamped with created, in a fixed order. /tmp is
// there for the private erofs mount directories of some kernels.
func rootfsTar(binary, caBundle []byte, created time.Time) ([]byte, error) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	hdr := func(name string, typ byte, mode int64, size int) *tar.Header {
		// USTAR: whole-second times, no PAX records (no atime or ctime).
		return &tar.Header{Name: name, Typeflag: typ, Mode: mode, Size: int64(size), ModTime: created,
			Uid: 0, Gid: 0, Format: tar.FormatUSTAR}
	}
	entries := []struct {
		h    *tar.Header
		body []byte
	}{
		{hdr("etc/", tar.TypeDir, 0o755, 0), nil},
		{hdr("etc/ssl/", tar.TypeDir, 0o755, 0), nil},
		{hdr("etc/ssl/certs/", tar.TypeDir, 0o755, 0), nil},
		{hdr(caPath, tar.TypeReg, 0o644, len(caBundle)), caBundle},
		{hdr("tmp/", tar.TypeDir, 0o1777, 0), nil},
		{hdr("usr/", tar.TypeDir, 0o755, 0), nil},
		{hdr("usr/bin/", tar.TypeDir, 0o755, 0), nil},
		{hdr(binaryPath, tar.TypeReg, 0o755, len(binary)), binary},
	}
	for _, e := range entries {
		if err := tw.WriteHeader(e.h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.body); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// image builds the image of one platform.
func image(platform, binPath string, caBundle []byte, s Spec) (v1.Image, *v1.Platform, error) {
	os_, arch, ok := strings.Cut(platform, "/")
	if !ok || os_ != "linux" || arch == "" {
		return nil, nil, fmt.Errorf("platform %q: want linux/ARCH", platform)
	}
	bin, err := os.ReadFile(binPath)
	if err != nil {
		return nil, nil, err
	}
	rootfs, err := rootfsTar(bin, caBundle, s.Created)
	if err != nil {
		return nil, nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(rootfs)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, nil, err
	}
	base := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	created := v1.Time{Time: s.Created}
	img, err := mutate.Append(base, mutate.Addendum{Layer: layer, History: v1.History{
		Created:   created,
		CreatedBy: "hack/image: the static csi-composefs binary and CA certificates",
	}})
	if err != nil {
		return nil, nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Created = os_, arch, created
	cf.Config = v1.Config{
		// The DaemonSet gives the arguments (serve and its flags).
		Entrypoint: []string{"/" + binaryPath},
		Env:        []string{"PATH=/usr/bin"},
		WorkingDir: "/",
		Labels: map[string]string{
			"org.opencontainers.image.title":       "csi-composefs",
			"org.opencontainers.image.description": "Kubernetes CSI node plugin for read-only composefs volumes",
			"org.opencontainers.image.version":     s.Version,
			"org.opencontainers.image.revision":    s.Revision,
		},
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, nil, err
	}
	return img, &v1.Platform{OS: os_, Architecture: arch}, nil
}

// Build writes the OCI layout and the per-platform tarballs.
func Build(s Spec) (Result, error) {
	ref, err := name.NewTag(s.Ref, name.StrictValidation)
	if err != nil {
		return Result{}, fmt.Errorf("image reference %q: %w", s.Ref, err)
	}
	if len(s.Binaries) == 0 {
		return Result{}, fmt.Errorf("no binary given")
	}
	ca, err := CABundle()
	if err != nil {
		return Result{}, err
	}
	platforms := make([]string, 0, len(s.Binaries))
	for p := range s.Binaries {
		platforms = append(platforms, p)
	}
	sort.Strings(platforms)

	// Start from nothing: a layout only ever grows.
	if err := os.RemoveAll(s.Out); err != nil {
		return Result{}, err
	}
	if err := os.MkdirAll(s.Out, 0o755); err != nil {
		return Result{}, err
	}
	res := Result{Manifests: map[string]v1.Hash{}, Tarballs: map[string]string{}, Layout: filepath.Join(s.Out, "oci")}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	repoName := filepath.Base(ref.RepositoryStr())
	for _, p := range platforms {
		img, plat, err := image(p, s.Binaries[p], ca, s)
		if err != nil {
			return Result{}, fmt.Errorf("%s: %w", p, err)
		}
		if res.Manifests[p], err = img.Digest(); err != nil {
			return Result{}, err
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: plat}})
		tb := filepath.Join(s.Out, fmt.Sprintf("%s-%s-%s-%s.tar", repoName, ref.TagStr(), plat.OS, plat.Architecture))
		if err := tarball.WriteToFile(tb, ref, img); err != nil {
			return Result{}, fmt.Errorf("%s: writing %s: %w", p, tb, err)
		}
		res.Tarballs[p] = tb
	}
	if res.Index, err = idx.Digest(); err != nil {
		return Result{}, err
	}
	lp, err := layout.Write(res.Layout, empty.Index)
	if err != nil {
		return Result{}, err
	}
	if err := lp.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": ref.TagStr(),
		"io.containerd.image.name":          ref.Name(),
	})); err != nil {
		return Result{}, fmt.Errorf("writing the OCI layout: %w", err)
	}
	return res, nil
}
