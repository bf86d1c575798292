package main

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/internal/reftools"
)

// The assets of composefs's tests/test-checksums.sh and tests/test-should-fail.sh
// (its tests/meson.build), in its order.
var (
	upstreamChecksumAssets = []string{
		"honggfuzz-write-inode-data.dump", "config.dump.gz", "config-with-hard-link.dump.gz",
		"special.dump", "longlink.dump", "bigfile.dump", "bigfile-xattr.dump", "special_v1.dump",
		"honggfuzz-long-symlink.dump", "honggfuzz-longlink-unterminated.dump",
		"honggfuzz-bigfile-with-acl.dump", "no-newline.dump", "honggfuzz-chardev-nonzero-size.dump",
		"cs9-x86_64-developer.dump.gz", "cs9-x86_64-minimal.dump.gz", "f36-x86_64-silverblue.dump.gz",
	}
	// Parsed without CFS_PARSE_STRICT; every other asset with it.
	upstreamNonStrict = map[string]bool{
		"no-newline.dump": true, "longlink.dump": true, "honggfuzz-longlink-unterminated.dump": true,
	}
	upstreamShouldFail = []string{
		"should-fail-long-link.dump", "should-fail-empty-xattr-key.dump", "should-fail-long-xattr-key.dump",
		"should-fail-long-xattr-value.dump", "should-fail-honggfuzz-long-xattr.dump", "should-fail-too-big.dump",
		"should-fail-no-ftype.dump", "should-fail-empty-name.dump", "should-fail-empty-link-name.dump",
		"should-fail-dot-name.dump", "should-fail-dotdot-name.dump", "should-fail-dir-hardlink.dump",
		"should-fail-self-hardlink.dump", "should-fail-big-inline.dump",
	}
)

// runCmdIn runs the CLI in-process with stdin and returns its exit code,
// standard output and standard error.
func runCmdIn(t *testing.T, stdin []byte, args ...string) (int, []byte, string) {
	t.Helper()
	root := newRootCmd()
	var out, errOut bytes.Buffer
	root.SetIn(bytes.NewReader(stdin))
	root.SetOut(&out)
	root.SetErr(&errOut)
	code := runWith(root, args, &errOut)
	return code, out.Bytes(), errOut.String()
}

// TestUpstreamChecksums runs composefs's tests/test-checksums.sh against
// `image build`: each asset piped into `image build [--min-version=V
// --max-version=V] --from-file - OUT`, parsed strictly unless upstream lists
// it as non-strict, must give the image whose sha256 upstream recorded;
// `image dump OUT | image build --from-file -` must give the same bytes; and
// fsck.erofs (from the reference tools, where they can be had) must accept it.
func TestUpstreamChecksums(t *testing.T) {
	assets := reftools.UpstreamAssets(t)
	var fsck string
	if c, err := reftools.FindCTools(); err == nil {
		fsck = c.Path("fsck.erofs")
	} else {
		t.Logf("images not checked with fsck.erofs: %v", err)
	}
	passed, missing := 0, []string{}
	for _, name := range upstreamChecksumAssets {
		src := filepath.Join(assets, name)
		if _, err := os.Stat(src); err != nil {
			missing = append(missing, name)
			continue
		}
		ok := t.Run(name, func(t *testing.T) {
			dump := readAsset(t, src)
			want := strings.Fields(string(mustRead(t, src+".sha256")))[0]
			var args []string
			if v, err := os.ReadFile(src + ".version"); err == nil {
				ver := strings.TrimSpace(string(v))
				args = append(args, "--min-version="+ver, "--max-version="+ver)
			}
			setParseStrict(t, !upstreamNonStrict[name])
			out := filepath.Join(t.TempDir(), "out.cfs")
			build := append(append([]string{"image", "build"}, args...), "--from-file", "-", out)
			if code, _, stderr := runCmdIn(t, dump, build...); code != exitOK {
				t.Fatalf("image build: exit %d: %s", code, stderr)
			}
			img := mustRead(t, out)
			sum := sha256.Sum256(img)
			if got := hex.EncodeToString(sum[:]); got != want {
				t.Errorf("sha256 of the image %s, upstream expects %s", got, want)
			}
			if fsck != "" {
				if b, err := exec.Command(fsck, out).CombinedOutput(); err != nil {
					t.Errorf("fsck.erofs: %v: %s", err, b)
				}
			}
			code, redump, stderr := runCmdIn(t, nil, "image", "dump", out)
			if code != exitOK {
				t.Fatalf("image dump: exit %d: %s", code, stderr)
			}
			out2 := filepath.Join(t.TempDir(), "out2.cfs")
			rebuild := append(append([]string{"image", "build"}, args...), "--from-file", "-", out2)
			if code, _, stderr := runCmdIn(t, redump, rebuild...); code != exitOK {
				t.Fatalf("image build of the image's dump: exit %d: %s", code, stderr)
			}
			if !bytes.Equal(mustRead(t, out2), img) {
				t.Errorf("the image is not reproducible from its dump")
			}
		})
		if ok {
			passed++
		}
	}
	t.Logf("upstream checksum assets: %d of %d present passed; not in the snapshot: %s",
		passed, len(upstreamChecksumAssets)-len(missing), strings.Join(missing, ", "))
	if passed == 0 {
		t.Fatal("no upstream asset found")
	}
}

// TestUpstreamShouldFail runs composefs's tests/test-should-fail.sh against
// `image build`: every should-fail asset must make `image build --from-file
// ASSET OUT` exit with status 1.
func TestUpstreamShouldFail(t *testing.T) {
	assets := reftools.UpstreamAssets(t)
	setParseStrict(t, false)
	for _, name := range upstreamShouldFail {
		t.Run(name, func(t *testing.T) {
			src := filepath.Join(assets, name)
			if _, err := os.Stat(src); err != nil {
				t.Skipf("not in the snapshot: %v", err)
			}
			code, _, stderr := runCmdIn(t, nil, "image", "build", "--from-file", src, filepath.Join(t.TempDir(), "out.cfs"))
			if code != exitFailure {
				t.Errorf("exit %d, want 1: %s", code, stderr)
			}
			t.Logf("refused: %s", strings.TrimSpace(stderr))
		})
	}
}

// setParseStrict sets CFS_PARSE_STRICT=1 or unsets it for the test.
func setParseStrict(t *testing.T, strict bool) {
	t.Setenv("CFS_PARSE_STRICT", "1") // restored when the test ends
	if !strict {
		os.Unsetenv("CFS_PARSE_STRICT")
	}
}

// readAsset reads an asset, gunzipping *.gz as upstream's zcat does.
func readAsset(t *testing.T, path string) []byte {
	t.Helper()
	b := mustRead(t, path)
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
