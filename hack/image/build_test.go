package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
)

const testRef = "example.test/csi-composefs/csi-composefs:v0.0.0-test"

// fakeBinaries writes one small file per platform standing for the static
// binary.
func fakeBinaries(t *testing.T) map[string]string {
	t.Helper()
	dir := t.TempDir()
	m := map[string]string{}
	for _, p := range []string{"linux/amd64", "linux/arm64"} {
		path := filepath.Join(dir, strings.ReplaceAll(p, "/", "-"))
		if err := os.WriteFile(path, []byte("\x7fELF fake binary for "+p), 0o755); err != nil {
			t.Fatal(err)
		}
		m[p] = path
	}
	return m
}

func build(t *testing.T, bins map[string]string, created time.Time) Result {
	t.Helper()
	res, err := Build(Spec{Binaries: bins, Ref: testRef, Version: "v0.0.0-test", Revision: "abc", Created: created, Out: filepath.Join(t.TempDir(), "out")})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// tree hashes every file under dir by its relative path.
func tree(t *testing.T, dir string) map[string]string {
	t.Helper()
	m := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		sum := sha256.Sum256(b)
		m[rel] = hex.EncodeToString(sum[:])
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestBuildReproducible: the same inputs and time give the same digests and
// byte-identical files; another SOURCE_DATE_EPOCH gives another digest.
func TestBuildReproducible(t *testing.T) {
	bins := fakeBinaries(t)
	at := time.Unix(1_700_000_000, 0).UTC()
	a, b := build(t, bins, at), build(t, bins, at)
	if a.Index != b.Index {
		t.Fatalf("index digests differ: %s, %s", a.Index, b.Index)
	}
	ta, tb := tree(t, filepath.Dir(a.Layout)), tree(t, filepath.Dir(b.Layout))
	if len(ta) == 0 || len(ta) != len(tb) {
		t.Fatalf("file sets differ: %d, %d", len(ta), len(tb))
	}
	for p, h := range ta {
		if tb[p] != h {
			t.Errorf("%s differs between two builds", p)
		}
	}
	if c := build(t, bins, at.Add(time.Second)); c.Index == a.Index {
		t.Error("another creation time gives the same digest")
	}
}

// TestImageContents: the layout holds a multi-arch index naming the tag;
// each image has only the binary, the CA bundle and a few directories, all
// root-owned and stamped with the creation time; the entry point is the
// binary.
func TestImageContents(t *testing.T) {
	bins := fakeBinaries(t)
	at := time.Unix(1_700_000_000, 0).UTC()
	res := build(t, bins, at)
	lp, err := layout.FromPath(res.Layout)
	if err != nil {
		t.Fatal(err)
	}
	top, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	tm, err := top.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(tm.Manifests) != 1 || tm.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "v0.0.0-test" || tm.Manifests[0].Digest != res.Index {
		t.Fatalf("index.json: %+v", tm.Manifests)
	}
	idx, err := top.ImageIndex(res.Index)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 2 {
		t.Fatalf("%d manifests, want amd64 and arm64", len(im.Manifests))
	}
	for _, m := range im.Manifests {
		p := m.Platform.OS + "/" + m.Platform.Architecture
		if _, ok := bins[p]; !ok || m.Digest != res.Manifests[p] {
			t.Fatalf("manifest for %s (%s): not built", p, m.Digest)
		}
		img, err := idx.Image(m.Digest)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if cf.OS+"/"+cf.Architecture != p || !cf.Created.Time.Equal(at) ||
			strings.Join(cf.Config.Entrypoint, " ") != "/usr/bin/csi-composefs" || cf.Config.User != "" {
			t.Errorf("%s config: %+v", p, cf)
		}
		layers, err := img.Layers()
		if err != nil || len(layers) != 1 {
			t.Fatalf("%s: %d layers (%v), want 1", p, len(layers), err)
		}
		rc, err := layers[0].Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		checkRootfs(t, p, tar.NewReader(rc), bins[p], at)
		rc.Close()
	}
}

func checkRootfs(t *testing.T, p string, tr *tar.Reader, bin string, at time.Time) {
	t.Helper()
	want := map[string]int64{
		"etc/": 0o755, "etc/ssl/": 0o755, "etc/ssl/certs/": 0o755, caPath: 0o644,
		"tmp/": 0o1777, "usr/": 0o755, "usr/bin/": 0o755, binaryPath: 0o755,
	}
	seen := 0
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		mode, ok := want[h.Name]
		if !ok {
			t.Errorf("%s: unexpected file %s", p, h.Name)
			continue
		}
		seen++
		if h.Mode != mode || h.Uid != 0 || h.Gid != 0 || !h.ModTime.Equal(at) {
			t.Errorf("%s: %s mode %o uid %d gid %d mtime %v", p, h.Name, h.Mode, h.Uid, h.Gid, h.ModTime)
		}
		body, _ := io.ReadAll(tr)
		switch h.Name {
		case binaryPath:
			if wantBin, _ := os.ReadFile(bin); !bytes.Equal(body, wantBin) {
				t.Errorf("%s: the binary in the image is not the one given", p)
			}
		case caPath:
			n := 0
			for rest := body; ; {
				var blk *pem.Block
				if blk, rest = pem.Decode(rest); blk == nil {
					break
				}
				if _, err := x509.ParseCertificate(blk.Bytes); err != nil {
					t.Fatal(err)
				}
				n++
			}
			if n < 100 {
				t.Errorf("%s: CA bundle holds %d certificates", p, n)
			}
		}
	}
	if seen != len(want) {
		t.Errorf("%s: %d of %d expected files", p, seen, len(want))
	}
}

// TestDockerTarball: the per-platform tarball is what `docker save` writes
// and `ctr images import` reads: manifest.json names the tag, a config
// file named by its digest, and the layer whose uncompressed digest is the
// config's diff_id.
func TestDockerTarball(t *testing.T) {
	res := build(t, fakeBinaries(t), time.Unix(0, 0))
	for p, tb := range res.Tarballs {
		files := map[string][]byte{}
		f, err := os.Open(tb)
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(f)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			files[h.Name], _ = io.ReadAll(tr)
		}
		f.Close()
		var man []struct {
			Config   string
			RepoTags []string
			Layers   []string
		}
		if err := json.Unmarshal(files["manifest.json"], &man); err != nil || len(man) != 1 {
			t.Fatalf("%s: manifest.json %q: %v", p, files["manifest.json"], err)
		}
		m := man[0]
		if len(m.RepoTags) != 1 || m.RepoTags[0] != testRef || len(m.Layers) != 1 {
			t.Fatalf("%s: manifest %+v", p, m)
		}
		cfgSum := sha256.Sum256(files[m.Config])
		if m.Config != "sha256:"+hex.EncodeToString(cfgSum[:]) {
			t.Errorf("%s: config file %s is not named by its digest", p, m.Config)
		}
		var cf v1.ConfigFile
		if err := json.Unmarshal(files[m.Config], &cf); err != nil {
			t.Fatal(err)
		}
		zr, err := gzip.NewReader(bytes.NewReader(files[m.Layers[0]]))
		if err != nil {
			t.Fatalf("%s: layer %s: %v", p, m.Layers[0], err)
		}
		raw, _ := io.ReadAll(zr)
		sum := sha256.Sum256(raw)
		if len(cf.RootFS.DiffIDs) != 1 || cf.RootFS.DiffIDs[0].Hex != hex.EncodeToString(sum[:]) {
			t.Errorf("%s: diff_ids %v, layer digest %x", p, cf.RootFS.DiffIDs, sum)
		}
	}
}

func TestBuildRefuses(t *testing.T) {
	bins := fakeBinaries(t)
	for _, s := range []Spec{
		{Binaries: bins, Ref: "no tag here:", Out: t.TempDir()},
		{Binaries: nil, Ref: testRef, Out: t.TempDir()},
		{Binaries: map[string]string{"windows/amd64": bins["linux/amd64"]}, Ref: testRef, Out: t.TempDir()},
		{Binaries: map[string]string{"linux/amd64": filepath.Join(t.TempDir(), "missing")}, Ref: testRef, Out: t.TempDir()},
	} {
		if _, err := Build(s); err == nil {
			t.Errorf("%+v: built", s)
		}
	}
}
