package cfs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// requireRoot skips a test that needs root (real mounts, device nodes,
// chown, trusted.* xattrs) when not run as root.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipped: needs root for real mounts, device nodes and trusted.* xattrs (CI runs as root)")
	}
}

// mountT mounts image on a fresh directory and unmounts it when the test
// ends (lazily if a plain unmount fails), so that no failure leaves a mount.
func mountT(t testing.TB, image string, opts MountOptions) (string, MountResult) {
	t.Helper()
	target := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	res, err := Mount(context.Background(), image, target, opts)
	if err != nil {
		t.Fatalf("Mount: %v", err)
	}
	cleanupMount(t, target)
	return target, res
}

func cleanupMount(t testing.TB, target string) {
	t.Cleanup(func() {
		if err := Unmount(target, false); err != nil {
			t.Errorf("unmount %s: %v; detaching lazily", target, err)
			if err := Unmount(target, true); err != nil {
				t.Errorf("lazy unmount %s: %v", target, err)
			}
		}
	})
}

// writeObject stores content in store under its fs-verity digest.
func writeObject(t testing.TB, store string, content []byte) Digest {
	t.Helper()
	d := VerityDigestOf(content)
	p := filepath.Join(store, d.ObjectPath())
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, content, 0o644); err != nil {
		t.Fatal(err)
	}
	return d
}

// expEntry is what one path of a mounted composefs tree must look like.
type expEntry struct {
	mode     uint32 // type and permission bits
	uid, gid uint32
	size     int64 // regular files and symlinks
	mtime    Timespec
	rdev     uint64 // devices
	link     string // symlink target
	content  []byte // regular file content
	xattrs   map[string]string
	sameAs   string // hardlink: path of an entry that must share the inode
	children []string
}

// Xattrs composefs adds for whiteouts and their parents; a mounted tree may
// show them where the source had none.
var composefsAddedXattrs = map[string]bool{
	"trusted.overlay.whiteout":  true,
	"user.overlay.whiteout":     true,
	"trusted.overlay.whiteouts": true,
	"user.overlay.whiteouts":    true,
	"trusted.overlay.opaque":    true,
	"user.overlay.opaque":       true,
}

// modelFromNode builds the expected view of a tree parsed from a dumpfile;
// store gives the content of external files.
func modelFromNode(t testing.TB, root *Node, store string) map[string]*expEntry {
	t.Helper()
	m := map[string]*expEntry{}
	err := root.Walk(func(n *Node) error {
		tn := n.Target()
		e := &expEntry{
			mode: tn.Mode, uid: tn.UID, gid: tn.GID, mtime: tn.Mtime, rdev: tn.Rdev,
			size: int64(tn.Size), xattrs: map[string]string{},
		}
		if n.LinkTo != nil {
			e.sameAs = tn.Path()
		}
		for _, x := range tn.Xattrs {
			if visibleXattr(tn, x.Key) {
				e.xattrs[x.Key] = string(x.Value)
			}
		}
		switch tn.Type() {
		case ModeSymlink:
			e.link = tn.Payload
		case ModeRegular:
			switch {
			case tn.Content != nil || tn.Size == 0:
				e.content = tn.Content
			case tn.Payload != "":
				b, err := os.ReadFile(filepath.Join(store, tn.Payload))
				if err != nil {
					return fmt.Errorf("%s: backing object: %w", n.Path(), err)
				}
				e.content = b
			default:
				return fmt.Errorf("%s: external file without payload", n.Path())
			}
		case ModeDir:
			for _, c := range tn.Children {
				e.children = append(e.children, c.Name)
			}
		}
		m[n.Path()] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// visibleXattr tells whether the kernel shows an image xattr: erofs drops
// names outside the namespaces it knows (stored with prefix index 0), and
// the VFS refuses user.* on anything but regular files and directories.
func visibleXattr(n *Node, key string) bool {
	if strings.HasPrefix(key, "user.") {
		// A whiteout shows as a regular file.
		return n.Type() == ModeRegular || n.Type() == ModeDir || n.IsWhiteout()
	}
	for _, p := range []string{"trusted.", "security."} {
		if strings.HasPrefix(key, p) {
			return true
		}
	}
	return key == "system.posix_acl_access" || key == "system.posix_acl_default"
}

// modelFromDir builds the expected view of a real directory tree.
func modelFromDir(t testing.TB, root string) map[string]*expEntry {
	t.Helper()
	m := map[string]*expEntry{}
	err := filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		key := "/" + rel
		if rel == "." {
			key = "/"
		}
		e, err := entryOf(p)
		if err != nil {
			return err
		}
		m[key] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// entryOf reads one path as an expEntry.
func entryOf(p string) (*expEntry, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return nil, &os.PathError{Op: "lstat", Path: p, Err: err}
	}
	e := &expEntry{
		mode: st.Mode, uid: st.Uid, gid: st.Gid, size: st.Size,
		mtime: Timespec{Sec: st.Mtim.Sec, Nsec: uint32(st.Mtim.Nsec)},
	}
	if t := st.Mode & unix.S_IFMT; t == unix.S_IFCHR || t == unix.S_IFBLK {
		e.rdev = Makedev(unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	x, err := readXattrs(p)
	if err != nil {
		return nil, err
	}
	e.xattrs = x
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFLNK:
		if e.link, err = os.Readlink(p); err != nil {
			return nil, err
		}
	case unix.S_IFREG:
		if e.content, err = os.ReadFile(p); err != nil {
			return nil, err
		}
	case unix.S_IFDIR:
		ents, err := os.ReadDir(p)
		if err != nil {
			return nil, err
		}
		for _, d := range ents {
			e.children = append(e.children, d.Name())
		}
	}
	return e, nil
}

func readXattrs(p string) (map[string]string, error) {
	out := map[string]string{}
	sz, err := unix.Llistxattr(p, nil)
	if err != nil || sz == 0 {
		if errors.Is(err, unix.ENOTSUP) {
			err = nil
		}
		return out, err
	}
	buf := make([]byte, sz)
	if sz, err = unix.Llistxattr(p, buf); err != nil {
		return nil, fmt.Errorf("listxattr %s: %w", p, err)
	}
	for _, k := range strings.Split(string(buf[:sz]), "\x00") {
		if k == "" {
			continue
		}
		vs, err := unix.Lgetxattr(p, k, nil)
		if errors.Is(err, unix.ENODATA) {
			// Listed but not readable: user.* on a symlink or device.
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, k, err)
		}
		v := make([]byte, vs)
		if vs, err = unix.Lgetxattr(p, k, v); err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, k, err)
		}
		out[k] = string(v[:vs])
	}
	return out, nil
}

// compareMount checks every expected path against the mounted tree at mnt:
// type, mode, ownership, size, mtime, device numbers, xattrs, symlink
// target, full content, directory listings and shared hardlink inodes.
// Whiteouts (character devices 0:0) are expected as composefs shows them:
// empty regular files marked with trusted.overlay.whiteout.
func compareMount(t testing.TB, want map[string]*expEntry, mnt string) {
	t.Helper()
	paths := make([]string, 0, len(want))
	for p := range want {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	bad := 0
	fail := func(format string, args ...any) {
		t.Helper()
		bad++
		if bad <= 30 {
			t.Errorf(format, args...)
		}
	}
	for _, p := range paths {
		w := want[p]
		full := filepath.Join(mnt, p)
		got, err := entryOf(full)
		if err != nil {
			fail("%q: %v", p, err)
			continue
		}
		wantMode, wantSize, wantContent := w.mode, w.size, w.content
		isWhiteout := w.mode&ModeTypeMask == ModeChar && w.rdev == 0
		if isWhiteout {
			wantMode, wantSize, wantContent = ModeRegular|w.mode&^ModeTypeMask, 0, []byte{}
			if _, ok := got.xattrs["trusted.overlay.whiteout"]; !ok {
				fail("%q: whiteout lacks trusted.overlay.whiteout: %v", p, got.xattrs)
			}
		}
		if got.mode != wantMode {
			fail("%q: mode %o, want %o", p, got.mode, wantMode)
			continue
		}
		if got.uid != w.uid || got.gid != w.gid {
			fail("%q: owner %d:%d, want %d:%d", p, got.uid, got.gid, w.uid, w.gid)
		}
		if got.mtime != w.mtime {
			fail("%q: mtime %d.%09d, want %d.%09d", p, got.mtime.Sec, got.mtime.Nsec, w.mtime.Sec, w.mtime.Nsec)
		}
		switch wantMode & ModeTypeMask {
		case ModeRegular:
			if got.size != wantSize {
				fail("%q: size %d, want %d", p, got.size, wantSize)
			}
			if !bytes.Equal(got.content, wantContent) {
				fail("%q: content differs (%d bytes, sha256 %x; want %d bytes, sha256 %x)", p,
					len(got.content), sha256.Sum256(got.content), len(wantContent), sha256.Sum256(wantContent))
			}
		case ModeSymlink:
			if got.link != w.link || got.size != int64(len(w.link)) {
				fail("%q: symlink -> %q (size %d), want %q", p, got.link, got.size, w.link)
			}
		case ModeChar, ModeBlock:
			if got.rdev != w.rdev {
				fail("%q: device %d:%d, want %d:%d", p, Major(got.rdev), Minor(got.rdev), Major(w.rdev), Minor(w.rdev))
			}
		case ModeDir:
			if strings.Join(got.children, "/") != strings.Join(w.children, "/") {
				fail("%q: entries %q, want %q", p, got.children, w.children)
			}
		}
		for k, v := range w.xattrs {
			if gv, ok := got.xattrs[k]; !ok {
				fail("%q: xattr %s missing", p, k)
			} else if gv != v {
				fail("%q: xattr %s = %q, want %q", p, k, gv, v)
			}
		}
		for k := range got.xattrs {
			if _, ok := w.xattrs[k]; !ok && !composefsAddedXattrs[k] {
				fail("%q: unexpected xattr %s", p, k)
			}
		}
		if w.sameAs != "" {
			var a, b unix.Stat_t
			if unix.Lstat(full, &a) == nil && unix.Lstat(filepath.Join(mnt, w.sameAs), &b) == nil && a.Ino != b.Ino {
				fail("%q: inode %d, want the inode of %s (%d)", p, a.Ino, w.sameAs, b.Ino)
			}
		}
	}
	if bad > 30 {
		t.Errorf("… %d mismatches in all", bad)
	}
}

// mountDumpFile parses a golden dumpfile.
func mountDumpFile(t testing.TB, name string) *Node {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	root, err := ParseDump(f, DumpOptions{})
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return root
}

// goldenStore creates the objects a golden image needs: every backing
// object of the golden vectors is pat(n) for one of these sizes.
func goldenStore(t testing.TB) string {
	t.Helper()
	store := filepath.Join(t.TempDir(), "objects")
	for _, n := range []int{4095, 4096, 4097, 5000, 1 << 20} {
		writeObject(t, store, pattern(n, 251))
	}
	return store
}

func TestMountGoldenImages(t *testing.T) {
	requireRoot(t)
	store := goldenStore(t)
	for _, name := range []string{"minimal", "longnames-bigdir", "basic", "basic.v1", "hardlink-whiteout", "xattrs"} {
		for _, legacy := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/legacy=%v", name, legacy), func(t *testing.T) {
				dump := strings.TrimSuffix(name, ".v1") + ".dump"
				want := modelFromNode(t, mountDumpFile(t, filepath.Join(goldenDir(t), dump)), store)
				mnt, res := mountT(t, filepath.Join(goldenDir(t), name+".cfs"), MountOptions{ObjectDirs: []string{store}, ForceLegacy: legacy})
				if legacy && res.Path != MountPathLegacy {
					t.Errorf("forced legacy mount took path %q", res.Path)
				}
				if res.Verity != VerityOff {
					t.Errorf("verity mode %q, want off", res.Verity)
				}
				compareMount(t, want, mnt)
			})
		}
	}
}

func TestMountTwoDataLayers(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	// Odd characters exercise the escaping of lowerdir= on the legacy path.
	first, second := filepath.Join(dir, "node store, a:b"), filepath.Join(dir, "host-store")
	// basic.cfs needs pat(4095), pat(4096), pat(4097), pat(5000), pat(1 MiB).
	writeObject(t, first, pattern(4095, 251))
	writeObject(t, first, pattern(5000, 251))
	writeObject(t, second, pattern(4096, 251))
	writeObject(t, second, pattern(1<<20, 251))
	writeObject(t, second, pattern(5000, 251)) // in both: the first wins, same bytes
	// pat(4097) is in neither store.
	for _, legacy := range []bool{false, true} {
		t.Run(fmt.Sprintf("legacy=%v", legacy), func(t *testing.T) {
			mnt, _ := mountT(t, filepath.Join(goldenDir(t), "basic.cfs"), MountOptions{ObjectDirs: []string{first, second}, ForceLegacy: legacy})
			for name, n := range map[string]int{"dir/ext-4095": 4095, "dir/ext-5000": 5000, "bigid": 4096, "ext-1m": 1 << 20} {
				got, err := os.ReadFile(filepath.Join(mnt, name))
				if err != nil {
					t.Errorf("%s: %v", name, err)
				} else if !bytes.Equal(got, pattern(n, 251)) {
					t.Errorf("%s: content differs", name)
				}
			}
			missing := filepath.Join(mnt, "dir/ext-4097")
			st, err := os.Lstat(missing)
			if err != nil || st.Size() != 4097 {
				t.Fatalf("metadata of a file whose object is missing: %v, %v", st, err)
			}
			_, err = os.ReadFile(missing)
			if err == nil {
				t.Fatalf("reading a file whose object is in no store succeeded")
			}
			t.Logf("object in no data layer: %v", err)
		})
	}
}

func TestMountInfoAndUnmount(t *testing.T) {
	requireRoot(t)
	store := goldenStore(t)
	image := filepath.Join(goldenDir(t), "basic.cfs")
	digest, err := ParseDigest(strings.TrimSpace(string(must(os.ReadFile(filepath.Join(goldenDir(t), "basic.digest"))))))
	if err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(t.TempDir(), "a dir, with: odd chars")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := IsMounted(target); ok || err != nil {
		t.Fatalf("IsMounted before mounting = %v, %v", ok, err)
	}
	if _, ok, err := IsMounted(filepath.Join(target, "absent")); ok || err != nil {
		t.Fatalf("IsMounted of an absent path = %v, %v", ok, err)
	}
	for _, legacy := range []bool{false, true} {
		res, err := Mount(context.Background(), image, target, MountOptions{
			ObjectDirs: []string{store}, NoExec: true, ImageDigest: &digest, Verity: VerityUserspace, ForceLegacy: legacy,
		})
		if err != nil {
			t.Fatal(err)
		}
		cleanupMount(t, target)
		if res.Verity != VerityUserspace || res.Source != "composefs:"+digest.String() {
			t.Errorf("result %+v", res)
		}
		mi, ok, err := IsMounted(target)
		if err != nil || !ok {
			t.Fatalf("IsMounted after mounting = %v, %v", ok, err)
		}
		if !mi.IsComposefs() {
			t.Errorf("not recognised as composefs: %+v", mi)
		}
		if d, ok := mi.ImageDigest(); !ok || d != digest {
			t.Errorf("image digest from mountinfo = %v, %v", d, ok)
		}
		for _, o := range []string{"ro", "nodev", "nosuid", "noexec", "metacopy=on", "redirect_dir=on"} {
			if !mi.HasOption(o) {
				t.Errorf("mount lacks %s: %s / %s", o, mi.Options, mi.SuperOpts)
			}
		}
		if mi.Verity() != "" {
			t.Errorf("userspace mode mounted with kernel verity: %s", mi.SuperOpts)
		}
		all, err := ComposefsMounts()
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, m := range all {
			found = found || m.MountPoint == mi.MountPoint
		}
		if !found {
			t.Errorf("ComposefsMounts does not list %s", mi.MountPoint)
		}
		if _, err := Mount(context.Background(), image, target, MountOptions{ObjectDirs: []string{store}}); !errors.Is(err, ErrAlreadyMounted) {
			t.Errorf("mounting over a mount: %v, want ErrAlreadyMounted", err)
		}
		if err := Unmount(target, false); err != nil {
			t.Fatal(err)
		}
		if _, ok, _ := IsMounted(target); ok {
			t.Fatal("still mounted after Unmount")
		}
		if err := Unmount(target, false); err != nil {
			t.Errorf("second Unmount: %v", err)
		}
		if err := Unmount(target, true); err != nil {
			t.Errorf("lazy Unmount of an unmounted target: %v", err)
		}
	}
	if err := Unmount(filepath.Join(target, "absent"), false); err != nil {
		t.Errorf("Unmount of an absent path: %v", err)
	}

	// Another kind of mount is seen but not taken for composefs.
	other := t.TempDir()
	if err := unix.Mount("tmpfs", other, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	cleanupMount(t, other)
	mi, ok, err := IsMounted(other)
	if err != nil || !ok || mi.IsComposefs() || mi.FSType != "tmpfs" {
		t.Errorf("tmpfs mount: %+v, %v, %v", mi, ok, err)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestMountRejects(t *testing.T) {
	requireRoot(t)
	store := goldenStore(t)
	ctx := context.Background()
	target := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	cleanupMount(t, target) // in case a case wrongly mounts
	image := filepath.Join(goldenDir(t), "basic.cfs")

	notImage := filepath.Join(t.TempDir(), "not.cfs")
	os.WriteFile(notImage, make([]byte, 8192), 0o644)
	if _, err := Mount(ctx, notImage, target, MountOptions{ObjectDirs: []string{store}}); !errors.Is(err, ErrNotComposefsImage) {
		t.Errorf("zero file: %v, want ErrNotComposefsImage", err)
	}
	if _, err := Mount(ctx, image, target, MountOptions{}); err == nil {
		t.Error("mount without object directories succeeded")
	}
	if _, err := Mount(ctx, image, target, MountOptions{ObjectDirs: []string{filepath.Join(store, "nope")}}); err == nil {
		t.Error("mount with a missing object directory succeeded")
	}
	if _, err := Mount(ctx, image, target, MountOptions{ObjectDirs: []string{store}, Verity: "sometimes"}); err == nil {
		t.Error("mount with a bad verity mode succeeded")
	}
	wrong := VerityDigestOf([]byte("not the image"))
	if _, err := Mount(ctx, image, target, MountOptions{ObjectDirs: []string{store}, Verity: VerityUserspace, ImageDigest: &wrong}); !errors.Is(err, ErrImageDigestMismatch) {
		t.Errorf("userspace mode with a wrong image digest: %v, want ErrImageDigestMismatch", err)
	}
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := Mount(canceled, image, target, MountOptions{ObjectDirs: []string{store}}); !errors.Is(err, context.Canceled) {
		t.Errorf("canceled context: %v", err)
	}
	if _, ok, _ := IsMounted(target); ok {
		t.Error("a rejected mount left something mounted")
	}
}

// TestMountPrivateDirLayer takes the path of kernels 6.7 to 6.14, which
// cannot use a detached erofs mount as a layer: the erofs is attached to a
// private temporary directory until the overlay holds it.
func TestMountPrivateDirLayer(t *testing.T) {
	requireRoot(t)
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	store := goldenStore(t)
	want := modelFromNode(t, mountDumpFile(t, filepath.Join(goldenDir(t), "basic.dump")), store)
	target := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	res, err := mount(context.Background(), filepath.Join(goldenDir(t), "basic.cfs"), target, MountOptions{ObjectDirs: []string{store}}, true)
	if err != nil {
		t.Fatal(err)
	}
	cleanupMount(t, target)
	if res.Path != MountPathPrivateDir {
		t.Errorf("path %q, want %q", res.Path, MountPathPrivateDir)
	}
	compareMount(t, want, target)
	if ents, _ := os.ReadDir(tmp); len(ents) != 0 {
		t.Errorf("the private erofs directory was left behind: %v", ents)
	}
	all, err := ReadMountInfo()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range all {
		if m.FSType == "erofs" && strings.HasPrefix(m.MountPoint, tmp) {
			t.Errorf("erofs mount left visible: %+v", m)
		}
	}
}
