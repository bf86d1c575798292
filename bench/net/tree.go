package main

import (
	"encoding/base64"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// A benchmark tree, its second version (10 % of the files with new
// content) and what the repository serves for them.
type tree struct {
	name       string
	files      int
	minSize    int64
	maxSize    int64
	totalBytes int64 // scale the sizes to this total; 0: as drawn

	dir                 string // the source tree
	bytes               int64  // its size
	newBytes            int64  // bytes of the second version's new files
	image1, image2      string // image names in the repository
	image2Bytes         int64
	blob, tarball, v2Tb string // names under the web root
	oci                 *ociTree
}

// trees of the benchmark: mixed sizes as pull-bench.sh (log-uniform 100 B
// to 4 MiB, scaled to the total) and small files (log-uniform 256 B to
// 256 KiB, like a language runtime's libraries).
func benchTrees(scale float64) map[string]*tree {
	return map[string]*tree{
		"mixed": {name: "mixed", files: int(10000 * scale), minSize: 100, maxSize: 4 << 20, totalBytes: int64(float64(1<<30) * scale)},
		"small": {name: "small", files: int(6000 * scale), minSize: 256, maxSize: 256 << 10},
	}
}

// generate writes the tree under root/src-NAME; half of the files are
// incompressible, half text-like (compresses about 4:1).
func (t *tree) generate(root string) error {
	t.dir = filepath.Join(root, "src-"+t.name)
	if _, err := os.Stat(t.dir + ".done"); err == nil {
		return t.measure()
	}
	os.RemoveAll(t.dir)
	rnd := rand.New(rand.NewPCG(42, uint64(t.files)))
	sizes := make([]float64, t.files)
	var sum float64
	for i := range sizes {
		sizes[i] = math.Exp(math.Log(float64(t.minSize)) + rnd.Float64()*(math.Log(float64(t.maxSize))-math.Log(float64(t.minSize))))
		sum += sizes[i]
	}
	scale := 1.0
	if t.totalBytes > 0 {
		scale = float64(t.totalBytes) / sum
	}
	for i, s := range sizes {
		size := max(int64(s*scale), 65)
		d := filepath.Join(t.dir, fmt.Sprintf("d%02d", i%64), fmt.Sprintf("e%d", i%7))
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("f%05d", i)), content(rnd, size, i%2 == 0), 0o644); err != nil {
			return err
		}
	}
	if err := os.WriteFile(t.dir+".done", nil, 0o644); err != nil {
		return err
	}
	return t.measure()
}

func content(rnd *rand.Rand, size int64, text bool) []byte {
	raw := make([]byte, size)
	for i := 0; i < len(raw); i += 8 {
		v := rnd.Uint64()
		for j := 0; j < 8 && i+j < len(raw); j++ {
			raw[i+j] = byte(v >> (8 * j))
		}
	}
	if !text {
		return raw
	}
	b := []byte(base64.StdEncoding.EncodeToString(raw))[:size]
	for i, c := range b {
		switch c {
		case 'A':
			b[i] = '\n'
		case 'B':
			b[i] = ' '
		}
	}
	return b
}

func (t *tree) paths() ([]string, error) {
	var files []string
	err := filepath.WalkDir(t.dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			files = append(files, p)
		}
		return err
	})
	sort.Strings(files)
	return files, err
}

func (t *tree) measure() error {
	files, err := t.paths()
	if err != nil {
		return err
	}
	t.bytes = 0
	for _, p := range files {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		t.bytes += fi.Size()
	}
	t.files = len(files)
	return nil
}

// publish builds the repository's files for the tree under www: both
// images with image build --repo (objects into www/objects, and with the
// binary's default packs of its small objects into www/packs, the second
// image reusing the first's), the tree as one file (the single-stream
// baseline) and as a gzip tarball.
func (t *tree) publish(bin, root, www string) error {
	t.image1, t.image2 = t.name+"-1.cfs", t.name+"-2.cfs"
	t.blob, t.tarball = t.name+".blob", t.name+".tar.gz"
	marker := filepath.Join(root, "www-"+t.name+".repo.done")
	v2 := t.dir + "-v2"
	if b, err := os.ReadFile(marker); err == nil {
		t.newBytes, _ = strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	} else {
		if err := sh("%s image build --force --repo %s --name %s %s >/dev/null", bin, q(www), q(t.image1), q(t.dir)); err != nil {
			return err
		}
		if err := sh("cd %s && find . -type f -print0 | sort -z | xargs -0 cat >%s", q(t.dir), q(www+"/"+t.blob)); err != nil {
			return err
		}
		if err := sh("tar -C %s -czf %s .", q(t.dir), q(www+"/"+t.tarball)); err != nil {
			return err
		}
		// The second version: hard links to the first but for 10 % of
		// the files, which get new content.
		os.RemoveAll(v2)
		if err := sh("cp -al %s %s", q(t.dir), q(v2)); err != nil {
			return err
		}
		files, err := t.paths()
		if err != nil {
			return err
		}
		rnd := rand.New(rand.NewPCG(7, uint64(len(files))))
		t.newBytes = 0
		for _, i := range rnd.Perm(len(files))[:len(files)/10] {
			p := filepath.Join(v2, strings.TrimPrefix(files[i], t.dir))
			fi, err := os.Stat(p)
			if err != nil {
				return err
			}
			os.Remove(p)
			if err := os.WriteFile(p, content(rnd, fi.Size(), false), 0o644); err != nil {
				return err
			}
			t.newBytes += fi.Size()
		}
		if err := sh("%s image build --force --repo %s --name %s %s >/dev/null", bin, q(www), q(t.image2), q(v2)); err != nil {
			return err
		}
		if err := os.WriteFile(marker, []byte(strconv.FormatInt(t.newBytes, 10)), 0o644); err != nil {
			return err
		}
	}
	fi, err := os.Stat(filepath.Join(www, "images", t.image2))
	if err != nil {
		return err
	}
	t.image2Bytes = fi.Size()
	return nil
}

func q(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func sh(format string, args ...any) error {
	c := fmt.Sprintf(format, args...)
	out, err := exec.Command("sh", "-c", c).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", c, err, strings.TrimSpace(string(out)))
	}
	return nil
}
