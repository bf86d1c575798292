package oci

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/csi-composefs/csi-composefs/internal/testoci"
	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// BenchmarkColdPublish compares, in one run, cold pulls of the same tree
// (BENCH_FILES files, BENCH_MB MiB in all; 5,000 and 500 by default) from a
// loopback registry: as a composefs artifact, as a plain image converted on
// the node, and the baseline users know, crane's pull + untar of the plain
// image; then a second version sharing 90 % of the files, pulled into the
// store holding the first. It prints each time and its ratio to the
// baseline. Run: go test -run '^$' -bench ColdPublish -benchtime 1x ./pkg/fetch/oci/
func BenchmarkColdPublish(b *testing.B) {
	files, mb := envInt("BENCH_FILES", 5000), envInt("BENCH_MB", 500)
	reg := testoci.NewRegistry(b, testoci.Options{})
	size := func(i int) int { return mb << 20 / files * (1 + i%3) * 2 / 4 }
	mk := func(v int) string {
		dir := b.TempDir()
		s := make([]uint64, files)
		for i := range s {
			s[i] = uint64(i)
			if v > 1 && i%10 == 0 {
				s[i] += 1 << 40
			}
		}
		writeTree(b, dir, s, size)
		return dir
	}
	dirs := []string{mk(1), mk(2)}
	for v, dir := range dirs {
		tag := fmt.Sprintf("v%d", v+1)
		ref, _ := ParseReference("oci://" + reg.Host + "/bench/art:" + tag)
		c, _ := NewClient(ref, Options{Insecure: []string{reg.Host}})
		opts := PushOptions{}
		if v > 0 {
			base, _ := ParseReference("oci://" + reg.Host + "/bench/art:v1")
			opts.Base = &base
		}
		in, err := InputFromDir(context.Background(), dir, cfsDirOptions(), cfsWriteV1())
		if err != nil {
			b.Fatal(err)
		}
		if _, err := Push(context.Background(), c, in, opts); err != nil {
			b.Fatal(err)
		}
		testoci.Push(b, reg.Host, "bench/img:"+tag, testoci.Image(b, dirLayer(b, dir)), "", "")
	}
	for i := 0; i < b.N; i++ {
		times := map[string][2]time.Duration{}
		for _, kind := range []string{"artifact", "image", "crane"} {
			var d [2]time.Duration
			st := openBenchStore(b)
			out := b.TempDir()
			for v := 0; v < 2; v++ {
				tag := fmt.Sprintf("v%d", v+1)
				start := time.Now()
				switch kind {
				case "artifact":
					ref, _ := ParseReference("oci://" + reg.Host + "/bench/art:" + tag)
					c, _ := NewClient(ref, Options{Insecure: []string{reg.Host}})
					if _, err := pullB(st, NewArtifactSource(c, ref), tag); err != nil {
						b.Fatal(err)
					}
				case "image":
					ref, _ := ParseReference("docker://" + reg.Host + "/bench/img:" + tag)
					c, _ := NewClient(ref, Options{Insecure: []string{reg.Host}})
					src := NewImageSource(c, ref, ConvertLimits{})
					dg, err := st.EnsureImage(context.Background(), src, fetch.ImageRef{Name: tag})
					if err != nil {
						b.Fatal(err)
					}
					if _, err := st.EnsureObjects(context.Background(), src, dg); err != nil {
						b.Fatal(err)
					}
				case "crane":
					cranePull(b, reg.Host+"/bench/img:"+tag, filepath.Join(out, tag))
				}
				d[v] = time.Since(start)
			}
			times[kind] = d
		}
		base := times["crane"]
		for _, k := range []string{"crane", "artifact", "image"} {
			t := times[k]
			b.Logf("%-8s cold %8v (%.2fx crane)   second version %8v (%.2fx crane)", k,
				t[0].Round(time.Millisecond), float64(t[0])/float64(base[0]), t[1].Round(time.Millisecond), float64(t[1])/float64(base[1]))
		}
	}
}

func envInt(k string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(k)); err == nil && v > 0 {
		return v
	}
	return def
}

func openBenchStore(b *testing.B) *fetch.Store {
	s, err := fetch.Open(context.Background(), b.TempDir(), fetch.Options{Retries: -1})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}

// dirLayer is a tar of dir (directories first, sorted).
func dirLayer(b *testing.B, dir string) []byte {
	var ents []testoci.Entry
	var paths []string
	_ = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && p != dir {
			paths = append(paths, p)
		}
		return nil
	})
	sort.Strings(paths)
	ents = append(ents, testoci.Dir("usr/"))
	for _, p := range paths {
		rel, _ := filepath.Rel(dir, p)
		fi, _ := os.Stat(p)
		if fi.IsDir() {
			ents = append(ents, testoci.Dir("usr/"+rel+"/"))
			continue
		}
		c, _ := os.ReadFile(p)
		ents = append(ents, testoci.File("usr/"+rel, string(c)))
	}
	return testoci.Layer(b, ents)
}

// cranePull is `crane pull` + untar: go-containerregistry fetches the image
// and flattens its layers (mutate.Extract), and the tar is written out.
func cranePull(b *testing.B, ref, out string) {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		b.Fatal(err)
	}
	img, err := remote.Image(r)
	if err != nil {
		b.Fatal(err)
	}
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			b.Fatal(err)
		}
		p := filepath.Join(out, h.Name)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				b.Fatal(err)
			}
		case tar.TypeReg:
			os.MkdirAll(filepath.Dir(p), 0o755)
			f, err := os.Create(p)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := io.Copy(f, tr); err != nil {
				b.Fatal(err)
			}
			f.Close()
		}
	}
}

func pullB(s *fetch.Store, src *ArtifactSource, name string) (fetch.Stats, error) {
	d, err := s.EnsureImage(context.Background(), src, fetch.ImageRef{Name: name})
	if err != nil {
		return fetch.Stats{}, err
	}
	return s.EnsureObjects(context.Background(), src, d)
}

func cfsDirOptions() cfs.DirOptions { return cfs.DirOptions{} }

func cfsWriteV1() cfs.WriteOptions { return cfs.WriteOptions{MinVersion: 1, MaxVersion: 1} }
