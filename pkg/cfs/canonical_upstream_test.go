package cfs

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/internal/reftools"
)

// TestCanonicalUpstreamAssets: the images of composefs's own test assets
// (every dumpfile of its tests/assets in the shared folder, at the version
// upstream builds it with) are canonical, as mkcomposefs 1.0.8 builds
// them (where the reference tools can be had; else as the project's
// writer does).
func TestCanonicalUpstreamAssets(t *testing.T) {
	if testing.Short() {
		t.Skip("builds upstream's large images (-short)")
	}
	dir := reftools.UpstreamAssets(t)
	ctools, cerr := reftools.FindCTools()
	if cerr != nil {
		t.Logf("mkcomposefs's own images not checked: %v", cerr)
	}
	names, err := filepath.Glob(filepath.Join(dir, "*.dump*"))
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, path := range names {
		name := filepath.Base(path)
		if strings.HasPrefix(name, "should-fail-") || strings.HasSuffix(name, ".sha256") || strings.HasSuffix(name, ".version") {
			continue
		}
		t.Run(name, func(t *testing.T) {
			dump := readUpstreamAsset(t, path)
			opts := DefaultWriteOptions()
			var args []string
			if v, err := os.ReadFile(path + ".version"); err == nil {
				n, err := strconv.Atoi(strings.TrimSpace(string(v)))
				if err != nil {
					t.Fatal(err)
				}
				opts = WriteOptions{MinVersion: n, MaxVersion: n}
				args = append(args, "--min-version="+strconv.Itoa(n), "--max-version="+strconv.Itoa(n))
			}
			// mkcomposefs's image where the tools can be had (the
			// writer's is the same bytes: cmd/csi-composefs's
			// TestUpstreamChecksums), else the writer's.
			images := map[string][]byte{}
			if ctools == nil {
				root, err := ParseDump(bytes.NewReader(dump), DumpOptions{})
				if err != nil {
					t.Fatal(err)
				}
				var ours bytes.Buffer
				if _, err := WriteImage(&ours, root, opts); err != nil {
					t.Fatal(err)
				}
				images["the writer's image"] = ours.Bytes()
			} else {
				out := filepath.Join(t.TempDir(), "c.cfs")
				cmd := ctools.Command("mkcomposefs", append(args, "--from-file", "-", out)...)
				cmd.Stdin = bytes.NewReader(dump)
				if b, err := cmd.CombinedOutput(); err != nil {
					t.Fatalf("mkcomposefs: %v: %s", err, b)
				}
				c, err := os.ReadFile(out)
				if err != nil {
					t.Fatal(err)
				}
				images["mkcomposefs's image"] = c
			}
			for what, img := range images {
				// Upstream's assets hold redirects that are not object
				// paths and files too large for the kernel: read them as
				// composefs-info does.
				if err := checkCanonicalBytes(img, OpenOptions{AllowForeignRedirects: true, AllowUnreadableFiles: true}); err != nil {
					t.Errorf("%s: %v", what, err)
				}
			}
		})
		checked++
	}
	if checked == 0 {
		t.Fatal("no upstream asset found")
	}
}

func readUpstreamAsset(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(path, ".gz") {
		return b
	}
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	out, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
