package cfs

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Sizes around the edges of the format: empty, inline (≤ 64 bytes from a
// directory), one past the inline threshold, around one block, and 1 MiB.
var propSizes = []int{0, 1, DirInlineContentMax - 1, DirInlineContentMax, DirInlineContentMax + 1, 4095, 4096, 4097, 1 << 20}

var propNames = []string{
	"plain", "with space", "tab\there", "ünïcödé-名前", "-dash", ".hidden", "..dots", "a=b",
	strings.Repeat("n", 255), strings.Repeat("é", 127) + "z",
}

var propModes = []uint32{0o644, 0o755, 0o600, 0o444, 0o4755, 0o2750, 0o1777, 0o000, 0o777, 0o6711}

var propIDs = []uint32{0, 1, 1000, 65534, 65535, 65536, 70000, 1 << 30}

// propGen makes a random tree on disk.
type propGen struct {
	t       testing.TB
	rng     *rand.Rand
	bytes   *rand.ChaCha8 // file content and xattr values
	files   []string      // regular files, hardlink candidates
	created []string      // every path below the root, in creation order
	entries int
}

func (g *propGen) name(used map[string]bool) string {
	for {
		var n string
		if g.rng.IntN(3) == 0 {
			n = propNames[g.rng.IntN(len(propNames))]
		} else {
			n = fmt.Sprintf("e%d", g.rng.IntN(1000))
		}
		if !used[n] {
			used[n] = true
			return n
		}
	}
}

func (g *propGen) dir(dir string, depth int) {
	used := map[string]bool{}
	count := 2 + g.rng.IntN(10)
	var kinds []int // the root gets one file of every size and one of every kind first
	if depth == 0 {
		count = 40
		for i := range propSizes {
			kinds = append(kinds, -1-i)
		}
		kinds = append(kinds, 10, 12, 14, 15, 16, 17, 18, 19, 20, 21)
	}
	for i := range count {
		if g.entries >= 150 {
			return
		}
		g.entries++
		p := filepath.Join(dir, g.name(used))
		k := g.rng.IntN(22)
		if i < len(kinds) {
			k = kinds[i]
		}
		var err error
		switch {
		case k < 8:
			size := propSizes[g.rng.IntN(len(propSizes))]
			if k < 0 {
				size = propSizes[-1-k]
			}
			b := make([]byte, size)
			g.bytes.Read(b)
			err = os.WriteFile(p, b, 0o644)
			g.files = append(g.files, p)
		case k < 13 && depth < 3:
			err = os.Mkdir(p, 0o755)
			if err == nil {
				g.created = append(g.created, p)
				g.dir(p, depth+1)
				continue
			}
		case k < 15:
			targets := []string{"plain", "../up/and/away", "/absolute/path with space", strings.Repeat("t/", 600) + "end", "é"}
			err = os.Symlink(targets[g.rng.IntN(len(targets))], p)
		case k == 15:
			err = unix.Mkfifo(p, 0o644)
		case k == 16:
			err = unix.Mknod(p, unix.S_IFCHR|0o644, int(unix.Mkdev(uint32(1+g.rng.IntN(300)), uint32(g.rng.IntN(70000)))))
		case k == 17:
			err = unix.Mknod(p, unix.S_IFBLK|0o644, int(unix.Mkdev(uint32(1+g.rng.IntN(300)), uint32(g.rng.IntN(70000)))))
		case k == 18:
			err = unix.Mknod(p, unix.S_IFCHR|0o644, 0) // an overlay whiteout
		case k == 20:
			err = g.sparse(p)
			g.files = append(g.files, p)
		case k == 21:
			err = unix.Mknod(p, unix.S_IFSOCK|0o644, 0)
		default:
			if len(g.files) == 0 {
				err = os.WriteFile(p, []byte("x"), 0o644)
				g.files = append(g.files, p)
			} else {
				err = os.Link(g.files[g.rng.IntN(len(g.files))], p)
			}
		}
		if err != nil {
			g.t.Fatalf("creating %s: %v", p, err)
		}
		g.created = append(g.created, p)
	}
}

// sparse writes a file with holes: a few random bytes at random offsets
// of a file up to 16 MiB long, its end possibly a hole.
func (g *propGen) sparse(p string) error {
	f, err := os.Create(p)
	if err != nil {
		return err
	}
	defer f.Close()
	size := []int64{DirInlineContentMax + 1, 3*4096 + 1, 1 << 20, 16 << 20}[g.rng.IntN(4)]
	for range g.rng.IntN(3) {
		b := make([]byte, 1+g.rng.IntN(5000))
		g.bytes.Read(b)
		if _, err := f.WriteAt(b, g.rng.Int64N(size)); err != nil {
			return err
		}
	}
	return f.Truncate(size)
}

// propACL is a POSIX access ACL (version 2: user::rwx user:1000:r-x
// group::r-x mask::r-x other::r--), as the kernel stores it in
// system.posix_acl_access and system.posix_acl_default.
var propACL = []byte{
	2, 0, 0, 0,
	0x01, 0, 7, 0, 0xff, 0xff, 0xff, 0xff,
	0x02, 0, 5, 0, 0xe8, 0x03, 0, 0,
	0x04, 0, 5, 0, 0xff, 0xff, 0xff, 0xff,
	0x10, 0, 5, 0, 0xff, 0xff, 0xff, 0xff,
	0x20, 0, 4, 0, 0xff, 0xff, 0xff, 0xff,
}

// finish sets ownership, modes, xattrs and mtimes, children before their
// parents so that directory mtimes stay as set.
func (g *propGen) finish(root string) {
	paths := append([]string{root}, g.created...)
	sort.Slice(paths, func(i, j int) bool { return len(paths[i]) > len(paths[j]) })
	seen := map[uint64]bool{}
	for _, p := range paths {
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			g.t.Fatal(err)
		}
		if seen[st.Ino] { // a hardlink: its inode is done already
			continue
		}
		seen[st.Ino] = true
		typ := st.Mode & unix.S_IFMT
		if err := unix.Lchown(p, int(propIDs[g.rng.IntN(len(propIDs))]), int(propIDs[g.rng.IntN(len(propIDs))])); err != nil {
			g.t.Fatal(err)
		}
		if typ != unix.S_IFLNK && p != root {
			mode := propModes[g.rng.IntN(len(propModes))]
			if typ == unix.S_IFDIR {
				mode |= 0o700 // keep the tree walkable
			}
			if err := unix.Chmod(p, mode); err != nil {
				g.t.Fatal(err)
			}
		}
		if typ == unix.S_IFREG || typ == unix.S_IFDIR {
			acls := []string{"system.posix_acl_access"}
			if typ == unix.S_IFDIR {
				acls = append(acls, "system.posix_acl_default")
			}
			for _, key := range acls {
				if g.rng.IntN(8) != 0 {
					continue
				}
				if err := unix.Lsetxattr(p, key, propACL, 0); err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
					g.t.Fatalf("setxattr %s %s: %v", p, key, err)
				}
			}
		}
		for i := range g.rng.IntN(4) {
			// trusted.overlay.* keys are escaped in the image and shown
			// unescaped by a mount.
			ns := []string{"trusted.", "security.", "trusted.overlay."}
			if typ == unix.S_IFREG || typ == unix.S_IFDIR {
				ns = append(ns, "user.", "user.")
			}
			v := make([]byte, g.rng.IntN(3)*g.rng.IntN(200))
			g.bytes.Read(v)
			key := fmt.Sprintf("%sk%d-%d", ns[g.rng.IntN(len(ns))], i, g.rng.IntN(100))
			if err := unix.Lsetxattr(p, key, v, 0); err != nil {
				g.t.Fatalf("setxattr %s %s: %v", p, key, err)
			}
		}
		ts := unix.Timespec{Sec: g.rng.Int64N(1 << 33), Nsec: g.rng.Int64N(1e9)}
		if g.rng.IntN(4) == 0 {
			ts.Nsec = 0
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			g.t.Fatal(err)
		}
	}
}

// TestMountPropertyRandomTrees builds random trees with the writer into a
// digest store, mounts each and compares every path with its source.
func TestMountPropertyRandomTrees(t *testing.T) {
	requireRoot(t)
	seeds := []uint64{1, 2, 3, 4, 5, 6}
	if testing.Short() {
		seeds = seeds[:2]
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			dir := t.TempDir()
			src := filepath.Join(dir, "src")
			if err := os.Mkdir(src, 0o755); err != nil {
				t.Fatal(err)
			}
			var key [32]byte
			key[0] = byte(seed)
			g := &propGen{t: t, rng: rand.New(rand.NewPCG(seed, 0x636f6d706f7365)), bytes: rand.NewChaCha8(key)}
			g.dir(src, 0)
			g.finish(src)
			store := filepath.Join(dir, "objects")
			if err := os.Mkdir(store, 0o755); err != nil {
				t.Fatal(err)
			}
			root, err := BuildFromDir(context.Background(), src, DirOptions{DigestStore: store})
			if err != nil {
				t.Fatalf("BuildFromDir: %v", err)
			}
			img := filepath.Join(dir, "tree.cfs")
			if _, err := WriteImageFile(img, root, DefaultWriteOptions()); err != nil {
				t.Fatalf("WriteImageFile: %v", err)
			}
			want := modelFromDir(t, src)
			mnt, _ := mountT(t, img, MountOptions{ObjectDirs: []string{store}, ForceLegacy: seed%2 == 0})
			compareMount(t, want, mnt)
			t.Logf("seed %d: %d paths compared", seed, len(want))
		})
	}
}

// TestMountRealdirCImage mounts realdir.cfs, written by the C mkcomposefs
// from the tree of the vectors README, and compares it with that tree
// rebuilt here; the objects come from building the same tree into a store.
func TestMountRealdirCImage(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "tree")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	makeRealdirTree(t, src)
	store := filepath.Join(dir, "objects")
	if _, err := BuildFromDir(context.Background(), src, DirOptions{DigestStore: store}); err != nil {
		t.Fatal(err)
	}
	want := modelFromDir(t, src)
	for _, name := range []string{"realdir.cfs", "realdir.v0.cfs"} {
		t.Run(name, func(t *testing.T) {
			mnt, _ := mountT(t, filepath.Join(goldenDir(t), name), MountOptions{ObjectDirs: []string{store}})
			compareMount(t, want, mnt)
		})
	}
}
