package localcluster

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// BusyboxImage is the image the tests' pods run: the distribution's static
// busybox and its applet links.
const BusyboxImage = "e2e.local/busybox:1"

// fileEntry is one file of an image layer.
type fileEntry struct {
	name, link string // link: symlink target
	data       []byte
	mode       int64
	dir        bool
}

// layerTar writes a reproducible tar (sorted, owner 0:0, mtime 0).
func layerTar(files []fileEntry) ([]byte, error) {
	sort.Slice(files, func(i, j int) bool { return files[i].name < files[j].name })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		h := &tar.Header{Name: f.name, Mode: f.mode, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
		switch {
		case f.dir:
			h.Typeflag, h.Name = tar.TypeDir, f.name+"/"
		case f.link != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, f.link
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(f.data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// writeImage writes a one-layer image as a docker-save tarball (what
// `ctr images import` and `kind load image-archive` read).
func writeImage(out, ref string, files []fileEntry, entrypoint []string) error {
	raw, err := layerTar(files)
	if err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil })
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", goarch()
	cf.Config = v1.Config{Entrypoint: entrypoint, Env: []string{"PATH=/bin:/usr/bin:/sbin:/usr/sbin"}, WorkingDir: "/"}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	tag, err := name.NewTag(ref)
	if err != nil {
		return err
	}
	tmp := out + ".tmp"
	if err := tarball.WriteToFile(tmp, tag, img); err != nil {
		return fmt.Errorf("writing image %s: %w", ref, err)
	}
	return os.Rename(tmp, out)
}

// WritePauseImage writes the sandbox image from a static pause binary.
func WritePauseImage(out, pauseBin string) error {
	data, err := os.ReadFile(pauseBin)
	if err != nil {
		return fmt.Errorf("pause binary: %w", err)
	}
	return writeImage(out, PauseImage, []fileEntry{{name: "pause", data: data, mode: 0o755}}, []string{"/pause"})
}

// WriteBusyboxImage writes BusyboxImage from the host's static busybox.
func WriteBusyboxImage(out string) error {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return fmt.Errorf("busybox not found: install busybox-static")
	}
	data, err := os.ReadFile(bb)
	if err != nil {
		return err
	}
	if static, err := isStatic(bb); err != nil || !static {
		return fmt.Errorf("%s is not a static binary (%v): install busybox-static", bb, err)
	}
	list, err := exec.Command(bb, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("busybox --list-full: %w", err)
	}
	files := []fileEntry{
		{name: "bin", dir: true, mode: 0o755}, {name: "sbin", dir: true, mode: 0o755},
		{name: "usr", dir: true, mode: 0o755}, {name: "usr/bin", dir: true, mode: 0o755},
		{name: "usr/sbin", dir: true, mode: 0o755}, {name: "tmp", dir: true, mode: 0o1777},
		{name: "etc", dir: true, mode: 0o755},
		{name: "etc/passwd", data: []byte("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"), mode: 0o644},
		{name: "etc/group", data: []byte("root:x:0:\nnobody:x:65534:\n"), mode: 0o644},
		{name: "bin/busybox", data: data, mode: 0o755},
	}
	seen := map[string]bool{"bin/busybox": true}
	for _, p := range strings.Fields(string(list)) {
		p = strings.TrimPrefix(p, "/")
		if seen[p] || !strings.Contains(p, "/") {
			continue
		}
		seen[p] = true
		rel, _ := relTo(path.Dir(p), "bin/busybox")
		files = append(files, fileEntry{name: p, link: rel, mode: 0o777})
	}
	return writeImage(out, BusyboxImage, files, []string{"/bin/sh"})
}

// isStatic reports whether an ELF binary has no program interpreter.
func isStatic(path string) (bool, error) {
	f, err := elf.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false, nil
		}
	}
	return true, nil
}

// relTo is the relative path from dir to target (both relative to /).
func relTo(dir, target string) (string, error) {
	up := strings.Count(dir, "/") + 1
	if dir == "." || dir == "" {
		up = 0
	}
	return strings.Repeat("../", up) + target, nil
}
