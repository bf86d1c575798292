package cfs

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/internal/reftools"
)

// Differential tests against the C composefs tools 1.0.8 (mkcomposefs,
// composefs-info, mount.composefs), installed on demand outside the
// repository by hack/c-tools.sh; skipped when its packages cannot be
// fetched. CFS_DIFF_CASES sets how many random cases each test runs.

// diffCases is the number of random cases: n by default (what CI runs),
// fewer with -short, CFS_DIFF_CASES when set.
func diffCases(t *testing.T, n int) int {
	if v := os.Getenv("CFS_DIFF_CASES"); v != "" {
		c, err := strconv.Atoi(v)
		if err != nil || c < 1 {
			t.Fatalf("CFS_DIFF_CASES=%q: want a positive number", v)
		}
		return c
	}
	if testing.Short() {
		return max(1, n/4)
	}
	return n
}

// diffDirOptions are the directory options the random trees are built with,
// one per case in turn, with the mkcomposefs flags that ask for the same.
var diffDirOptions = []struct {
	flags []string
	opts  DirOptions
}{
	{nil, DirOptions{}},
	{[]string{"--use-epoch"}, DirOptions{UseEpoch: true}},
	{[]string{"--skip-devices"}, DirOptions{SkipDevices: true}},
	{[]string{"--user-xattrs"}, DirOptions{UserXattrs: true}},
	{[]string{"--skip-xattrs", "--min-version=1"}, DirOptions{SkipXattrs: true}},
	{[]string{"--max-version=0"}, DirOptions{}},
}

// TestCDiffRandomTrees builds random directory trees (hard links, xattrs of
// every namespace including ACLs and trusted.overlay.*, devices, FIFOs,
// sockets, whiteouts, 255-byte and odd names, sparse files, 63/64/65-byte
// files, odd modes and owners) with mkcomposefs --digest-store and with
// BuildFromDir into a store: the images, digests and stores must be equal;
// composefs-info dump of the image must equal WriteDump of what Open reads;
// and, as root, mount.composefs must mount our image and Mount theirs, each
// showing the source tree.
func TestCDiffRandomTrees(t *testing.T) {
	requireRoot(t) // device nodes, owners, trusted.* xattrs, mounts
	c := reftools.RequireCTools(t)
	for i := range diffCases(t, 6) {
		seed := uint64(i + 1)
		variant := diffDirOptions[i%len(diffDirOptions)]
		t.Run(fmt.Sprintf("seed=%d%s", seed, strings.Join(variant.flags, "")), func(t *testing.T) {
			dir := t.TempDir()
			src := filepath.Join(dir, "src")
			if err := os.Mkdir(src, 0o755); err != nil {
				t.Fatal(err)
			}
			var key [32]byte
			key[0], key[1] = byte(seed), 'd'
			g := &propGen{t: t, rng: rand.New(rand.NewPCG(seed, 0x64696666)), bytes: rand.NewChaCha8(key)}
			g.dir(src, 0)
			g.finish(src)

			cImg, cStore := filepath.Join(dir, "c.cfs"), filepath.Join(dir, "c-objects")
			args := append(append([]string{"--print-digest", "--digest-store=" + cStore}, variant.flags...), src, cImg)
			out, err := c.Run(nil, "mkcomposefs", args...)
			if err != nil {
				t.Fatal(err)
			}
			oImg, oStore := filepath.Join(dir, "ours.cfs"), filepath.Join(dir, "objects")
			opts := variant.opts
			opts.DigestStore = oStore
			root, err := BuildFromDir(context.Background(), src, opts)
			if err != nil {
				t.Fatalf("BuildFromDir: %v", err)
			}
			wopts := DefaultWriteOptions()
			for _, f := range variant.flags {
				if v, ok := strings.CutPrefix(f, "--min-version="); ok {
					wopts.MinVersion, _ = strconv.Atoi(v)
				}
				if v, ok := strings.CutPrefix(f, "--max-version="); ok {
					wopts.MaxVersion, _ = strconv.Atoi(v)
				}
			}
			d, err := WriteImageFile(oImg, root, wopts)
			if err != nil {
				t.Fatalf("WriteImageFile: %v", err)
			}
			ours, theirs := mustReadFile(t, oImg), mustReadFile(t, cImg)
			if !bytes.Equal(ours, theirs) {
				t.Fatalf("image differs from mkcomposefs's: %s", firstDiff(ours, theirs))
			}
			if got := strings.TrimSpace(string(out)); got != d.String() {
				t.Errorf("mkcomposefs printed digest %s, ours %s", got, d)
			}
			if o, co := storeListing(t, oStore), storeListing(t, cStore); strings.Join(o, "\n") != strings.Join(co, "\n") {
				t.Errorf("stores differ:\n ours %v\n C    %v", o, co)
			}
			cDiffDump(t, c, oImg, ours)

			// Each mounter shows the other writer's image as the source tree
			// (with the build options, as the first mount shows it).
			want := modelFromDir(t, src)
			mnt1 := filepath.Join(dir, "mnt-c")
			if err := os.Mkdir(mnt1, 0o755); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Run(nil, "mount.composefs", "-o", "basedir="+cStore, oImg, mnt1); err != nil {
				t.Fatal(err)
			}
			cleanupMount(t, mnt1)
			if variant.flags == nil || variant.flags[0] == "--max-version=0" {
				compareMount(t, want, mnt1)
			} else {
				want = modelFromDir(t, mnt1)
			}
			mnt2, _ := mountT(t, cImg, MountOptions{ObjectDirs: []string{oStore}})
			compareMount(t, want, mnt2)
			t.Logf("%d paths, %d objects, image %d bytes", len(want), len(storeListing(t, oStore)), len(ours))
		})
	}
}

// TestCDiffRandomDumps writes random dumpfiles (every file type, whiteouts
// in nested directories, hardlinks to earlier and later paths, names of
// any byte, 255-byte names, names that collide with the root's 00..ff,
// long symlinks, inline content up to 5000 bytes, external files up to
// 2^53 bytes with digest and non-digest payloads, xattrs of every prefix
// index including trusted.overlay.* and values shared between inodes,
// owners and mtimes that force extended inodes, all format versions) and
// builds each with mkcomposefs --from-file (CFS_PARSE_STRICT=1) and
// ParseDump+WriteImage: same bytes, same digest; composefs-info dump of the
// image equals WriteDump of what Open reads.
func TestCDiffRandomDumps(t *testing.T) {
	c := reftools.RequireCTools(t)
	versions := [][]string{nil, {"--min-version=0", "--max-version=0"}, {"--min-version=1", "--max-version=1"}, {"--max-version=0"}}
	for i := range diffCases(t, 40) {
		seed := uint64(i + 1)
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			g := &dumpGen{rng: rand.New(rand.NewPCG(seed, 0x64756d70))}
			dump := g.generate()
			vflags := versions[i%len(versions)]
			wopts := DefaultWriteOptions()
			switch i % len(versions) {
			case 1:
				wopts = WriteOptions{0, 0}
			case 2:
				wopts = WriteOptions{1, 1}
			case 3:
				wopts = WriteOptions{0, 0}
			}
			dir := t.TempDir()
			cImg := filepath.Join(dir, "c.cfs")
			cmd := c.Command("mkcomposefs", append(append([]string{"--print-digest", "--from-file"}, vflags...), "-", cImg)...)
			cmd.Env = append(os.Environ(), ParseStrictEnv+"=1")
			cmd.Stdin = bytes.NewReader(dump)
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("mkcomposefs: %v: %s\ndump:\n%s", err, exitStderr(err), dump)
			}
			root, err := ParseDump(bytes.NewReader(dump), DumpOptions{Strict: true})
			if err != nil {
				t.Fatalf("ParseDump: %v", err)
			}
			var buf bytes.Buffer
			d, err := WriteImage(&buf, root, wopts)
			if err != nil {
				t.Fatalf("WriteImage: %v", err)
			}
			theirs := mustReadFile(t, cImg)
			if !bytes.Equal(buf.Bytes(), theirs) {
				p := filepath.Join(dir, "dump")
				os.WriteFile(p, dump, 0o644)
				t.Fatalf("image differs from mkcomposefs's: %s (%d lines)", firstDiff(buf.Bytes(), theirs), bytes.Count(dump, []byte("\n")))
			}
			if got := strings.TrimSpace(string(out)); got != d.String() {
				t.Errorf("mkcomposefs printed digest %s, ours %s", got, d)
			}
			cDiffDump(t, c, cImg, theirs)
		})
	}
}

// cDiffDump compares composefs-info dump of the image at path (bytes img)
// with WriteDump of what Open reads, allowing only the C reader's redirect
// off-by-one (format notes §2.15).
func cDiffDump(t *testing.T, c *reftools.CTools, path string, img []byte) {
	t.Helper()
	want, err := c.Run(nil, "composefs-info", "dump", path)
	if err != nil {
		t.Fatal(err)
	}
	opts := OpenOptions{AllowForeignRedirects: true, AllowUnreadableFiles: true}
	im, err := rdOpenBytes(img, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	rdCheckDumpImage(t, img, opts, im, nil)
	// composefs-info --filter: the first two entries of the root.
	var top []string
	for _, c := range im.Root().Children[:min(2, len(im.Root().Children))] {
		top = append(top, c.Name)
	}
	if len(top) > 0 {
		args := []string{}
		for _, name := range top {
			args = append(args, "--filter="+name)
		}
		wantF, err := c.Run(nil, "composefs-info", append(args, "dump", path)...)
		if err != nil {
			t.Fatal(err)
		}
		var gotF bytes.Buffer
		if err := DumpImage(&gotF, bytes.NewReader(img), int64(len(img)), opts, top...); err != nil {
			t.Fatal(err)
		}
		if gotF.String() != string(wantF) && !rdCReaderRedirectBug(t, im) && !cReaderHasLastShortXattr(t, im) {
			t.Errorf("DumpImage with %v differs from composefs-info %v dump:\n%s", top, args, rdFirstLineDiff(gotF.String(), string(wantF)))
		}
	}
	cReaderDropsLastShortXattr(t, im)
	var got bytes.Buffer
	if err := WriteDump(&got, im.Root()); err != nil {
		t.Fatal(err)
	}
	if got.String() != string(want) {
		if rdCReaderRedirectBug(t, im) && rdEqualModuloRedirectBug(got.String(), string(want)) {
			return
		}
		t.Errorf("dump differs from composefs-info dump:\n%s", rdFirstLineDiff(got.String(), string(want)))
	}
}

// cReaderHasLastShortXattr reports whether cReaderDropsLastShortXattr
// would change the tree of img.
func cReaderHasLastShortXattr(t *testing.T, img *Image) bool {
	var before, after bytes.Buffer
	WriteDump(&before, img.Root())
	cReaderDropsLastShortXattr(t, img)
	WriteDump(&after, img.Root())
	return before.String() != after.String()
}

// cReaderDropsLastShortXattr removes from the tree of img what
// composefs-info does not see: its reader stops before an inline xattr
// entry of 4 bytes (an empty name after its prefix, such as
// system.posix_acl_default, and an empty value) that ends the inode's
// inline xattrs ("while (p + sizeof(entry) < end)"). The kernel sees it.
func cReaderDropsLastShortXattr(t *testing.T, img *Image) {
	t.Helper()
	img.Root().Walk(func(n *Node) error {
		if n.LinkTo != nil {
			return nil
		}
		nid, _ := img.Nid(n)
		ri, err := img.Inode(nid)
		if err != nil {
			t.Fatal(err)
		}
		var last *RawXattr
		for i := range ri.Xattrs {
			if !ri.Xattrs[i].Shared {
				last = &ri.Xattrs[i]
			}
		}
		if last == nil || len(last.Value) != 0 || last.Key != rdXattrPrefixes[last.Index] {
			return nil
		}
		for i, x := range n.Xattrs {
			if x.Key == last.Key {
				n.Xattrs = append(n.Xattrs[:i:i], n.Xattrs[i+1:]...)
				break
			}
		}
		return nil
	})
}

func exitStderr(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}

func mustReadFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// storeListing lists the objects of a store with their sizes and checks
// that each has the digest its name says.
func storeListing(t *testing.T, store string) []string {
	t.Helper()
	var out []string
	err := filepath.Walk(store, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(store, p)
		if d, perr := ParseObjectPath(rel); perr != nil {
			t.Errorf("store %s holds %s", store, rel)
		} else if err := checkObject(p, d); err != nil {
			t.Errorf("store %s: %s: %v", store, rel, err)
		}
		out = append(out, fmt.Sprintf("%s %d %o", rel, fi.Size(), fi.Mode().Perm()))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// dumpGen writes a random, valid (strictly parsable) dumpfile.
type dumpGen struct {
	rng     *rand.Rand
	w       *bufio.Writer
	targets []string // escaped paths of non-directories a hardlink may name
	later   []string // hardlink lines written at the end, some to paths after them
	entries int
	shared  []string // xattrs ("key=value", escaped) used by several inodes
	mtimes  []string
}

func (g *dumpGen) generate() []byte {
	var b bytes.Buffer
	g.w = bufio.NewWriter(&b)
	g.mtimes = []string{"0.0", "1700000000.0", "1700000000.5", "-5.999999999", "4294967296.0"}
	for range 6 {
		g.shared = append(g.shared, g.xattr())
	}
	g.line("/", "0", "40755", "2", "-", "-", "-")
	g.dir("", 0)
	for _, l := range g.later {
		g.w.WriteString(l)
	}
	g.w.Flush()
	return b.Bytes()
}

func (g *dumpGen) esc(s string, mode int) string {
	var b bytes.Buffer
	w := bufio.NewWriter(&b)
	dwEscape(w, s, mode)
	w.Flush()
	return b.String()
}

func (g *dumpGen) randBytes(n int, avoid string) string {
	b := make([]byte, n)
	for i := range b {
		for {
			b[i] = byte(1 + g.rng.IntN(255))
			if !strings.ContainsRune(avoid, rune(b[i])) || b[i] >= 0x80 {
				break
			}
		}
	}
	return string(b)
}

func (g *dumpGen) name(used map[string]bool) string {
	for {
		var n string
		switch g.rng.IntN(10) {
		case 0:
			n = fmt.Sprintf("%02x", g.rng.IntN(256)) // may shadow a root whiteout
		case 1:
			n = g.randBytes(1+g.rng.IntN(20), "/")
		case 2:
			n = strings.Repeat(string(rune('a'+g.rng.IntN(26))), 255)
		case 3:
			n = []string{"-", "a b", "=", `\`, ".hidden", "..x", "é", "\n"}[g.rng.IntN(8)]
		default:
			n = fmt.Sprintf("e%d", g.rng.IntN(500))
		}
		if n != "." && n != ".." && !used[n] {
			used[n] = true
			return n
		}
	}
}

func (g *dumpGen) xattr() string {
	prefixes := []string{"user.", "trusted.", "security.", "system.posix_acl_access", "system.posix_acl_default",
		"trusted.overlay.", "trusted.overlay.overlay.", "lustre.", "other.", ""}
	key := prefixes[g.rng.IntN(len(prefixes))]
	if !strings.HasPrefix(key, "system.") || g.rng.IntN(4) == 0 {
		key += g.randBytes(1+g.rng.IntN(12), "=")
	}
	v := g.randBytes([]int{0, 1, 3, 20, 200, 3000}[g.rng.IntN(6)], "")
	return g.esc(key, dwEscapeEqual) + "=" + g.esc(v, dwEscapeEqual)
}

func (g *dumpGen) xattrs() []string {
	var xs []string
	seen := map[string]bool{}
	for range []int{0, 0, 1, 2, 4}[g.rng.IntN(5)] {
		x := g.xattr()
		if g.rng.IntN(2) == 0 {
			x = g.shared[g.rng.IntN(len(g.shared))]
		}
		k, _, _ := strings.Cut(x, "=")
		if !seen[k] {
			seen[k] = true
			xs = append(xs, x)
		}
	}
	return xs
}

// line writes one entry: PATH SIZE MODE NLINK UID GID RDEV MTIME PAYLOAD CONTENT DIGEST XATTRS.
func (g *dumpGen) line(path, size, mode, nlink, payload, content, digest string, xattrs ...string) {
	ids := []string{"0", "1", "1000", "65535", "65536", "4294967295"}
	uid, gid := ids[g.rng.IntN(len(ids))], ids[g.rng.IntN(len(ids))]
	if g.rng.IntN(3) > 0 {
		uid, gid = "0", "0"
	}
	rdev := "0"
	if m, _ := strconv.ParseUint(mode, 8, 32); m&ModeTypeMask == ModeChar || m&ModeTypeMask == ModeBlock {
		rdev = []string{"0", "259", "2049", "286338160", strconv.Itoa(g.rng.IntN(1 << 30))}[g.rng.IntN(5)]
		if m&ModeTypeMask == ModeBlock && rdev == "0" {
			rdev = "1"
		}
	}
	mtime := g.mtimes[g.rng.IntN(len(g.mtimes))]
	if g.rng.IntN(2) == 0 {
		mtime = g.mtimes[0]
	}
	fmt.Fprintf(g.w, "%s %s %s %s %s %s %s %s %s %s %s", path, size, mode, nlink, uid, gid, rdev, mtime, payload, content, digest)
	for _, x := range xattrs {
		g.w.WriteString(" " + x)
	}
	g.w.WriteByte('\n')
}

// mode returns typ with random permission bits, in octal.
func (g *dumpGen) mode(typ uint32) string {
	perm := []uint32{0o644, 0o755, 0o600, 0o4755, 0o1777, 0o000, 0o7777}[g.rng.IntN(7)]
	return strconv.FormatUint(uint64(typ|perm), 8)
}

func (g *dumpGen) dir(path string, depth int) {
	used := map[string]bool{}
	for range 2 + g.rng.IntN(12) {
		if g.entries >= 300 {
			return
		}
		g.entries++
		p := path + "/" + g.esc(g.name(used), dwEscapeLoneDash)
		nlink := []string{"1", "1", "2", "70000"}[g.rng.IntN(4)]
		switch k := g.rng.IntN(20); {
		case k < 3 && depth < 4:
			g.line(p, "4096", g.mode(ModeDir), "2", "-", "-", "-", g.xattrs()...)
			g.dir(p, depth+1)
			continue
		case k < 6: // inline content
			n := []int{1, 63, 64, 65, 2048, 2049, 4096, 4097, 5000}[g.rng.IntN(9)]
			content := g.esc(g.randBytes(n, ""), dwEscapeLoneDash)
			g.line(p, strconv.Itoa(n), g.mode(ModeRegular), nlink, "-", content, "-", g.xattrs()...)
		case k < 10: // external
			size := []uint64{1, 4095, 4096, 4097, 1 << 20, 1 << 40, 1 << 53}[g.rng.IntN(7)]
			var dg Digest
			for j := range dg {
				dg[j] = byte(g.rng.IntN(256))
			}
			payload, digest := dg.ObjectPath(), dg.String()
			switch g.rng.IntN(5) {
			case 0:
				payload = "-"
			case 1:
				payload = g.esc(g.randBytes(1+g.rng.IntN(100), ""), dwEscapeLoneDash)
			case 2:
				digest = "-"
			}
			g.line(p, strconv.FormatUint(size, 10), g.mode(ModeRegular), nlink, payload, "-", digest, g.xattrs()...)
		case k == 10:
			g.line(p, "0", g.mode(ModeRegular), nlink, "-", "-", "-", g.xattrs()...)
		case k < 13:
			target := g.randBytes([]int{1, 10, 200, 4000, 4095}[g.rng.IntN(5)], "")
			g.line(p, strconv.Itoa(len(target)), "120777", "1", g.esc(target, dwEscapeLoneDash), "-", "-", g.xattrs()...)
		case k == 13:
			g.line(p, "0", g.mode(ModeChar), nlink, "-", "-", "-", g.xattrs()...) // may be a whiteout (rdev 0)
			continue                                                              // never a hardlink target
		case k == 14:
			g.line(p, "0", g.mode(ModeBlock), nlink, "-", "-", "-", g.xattrs()...)
		case k == 15:
			g.line(p, "0", g.mode(ModeFIFO), nlink, "-", "-", "-", g.xattrs()...)
		case k == 16:
			g.line(p, "0", g.mode(ModeSocket), nlink, "-", "-", "-", g.xattrs()...)
		default: // a hardlink, to an earlier path now or to any path at the end
			if len(g.targets) > 0 && g.rng.IntN(2) == 0 {
				fmt.Fprintf(g.w, "%s 0 @100644 0 0 0 0 0.0 %s - -\n", p, g.targets[g.rng.IntN(len(g.targets))])
			} else {
				g.later = append(g.later, "")
				i := len(g.later) - 1
				defer func() {
					if len(g.targets) > 0 {
						g.later[i] = fmt.Sprintf("%s 0 @100644 0 0 0 0 0.0 %s - -\n", p, g.targets[g.rng.IntN(len(g.targets))])
					}
				}()
				// A hardlink line must come after its parent: written at
				// the end, it does.
			}
			continue
		}
		g.targets = append(g.targets, p)
	}
}
