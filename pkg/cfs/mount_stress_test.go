package cfs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// imageWithObject writes an image whose root holds one external file backed
// by object d of the given size, plus a small inline file named extra (so
// that two such images differ).
func imageWithObject(t testing.TB, path string, d Digest, size int64, extra string) {
	t.Helper()
	root := &Node{Mode: ModeDir | 0o755, Nlink: 2, Mtime: Timespec{Sec: 1700000000}}
	big := &Node{Name: "big", Mode: ModeRegular | 0o644, Nlink: 1, Size: uint64(size), Payload: d.ObjectPath(), Digest: &d, Mtime: root.Mtime}
	small := &Node{Name: extra, Mode: ModeRegular | 0o644, Nlink: 1, Size: uint64(len(extra)), Content: []byte(extra), Mtime: root.Mtime}
	for _, c := range []*Node{big, small} {
		if err := root.AddChild(c); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := WriteImageFile(path, root, DefaultWriteOptions()); err != nil {
		t.Fatal(err)
	}
}

// loopExt4 makes a filesystem of its own for a test: an ext4 image of size
// bytes (sparse, under the test's temporary directory), formatted with
// mkfs.ext4 and loop-mounted at a new directory, which it returns. Its page
// cache behaves as on a disk whatever TMPDIR is (tmpfs keeps every file
// resident), and nothing else uses it.
func loopExt4(t testing.TB, size int64) string {
	t.Helper()
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "fs.ext4"), filepath.Join(dir, "mnt")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 (e2fsprogs; hack/install-deps.sh installs it): %v\n%s", err, out)
	}
	if out, err := exec.Command("mount", "-t", "ext4", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Fatalf("loop-mounting %s: %v\n%s", img, err, out)
	}
	t.Cleanup(func() {
		// The erofs mounts of images on this filesystem are gone by now,
		// but the kernel may still be releasing their files (deferred
		// work, slow on a loaded machine): EBUSY for a while is that; for
		// 10 s it would be a reference the mounts leaked.
		err := unix.Unmount(mnt, 0)
		for deadline := time.Now().Add(10 * time.Second); errors.Is(err, unix.EBUSY) && time.Now().Before(deadline); {
			time.Sleep(50 * time.Millisecond)
			err = unix.Unmount(mnt, 0)
		}
		if err != nil {
			t.Errorf("unmounting %s: %v", mnt, err)
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	return mnt
}

// residentBytes counts the bytes of a file in the page cache (mincore).
func residentBytes(t testing.TB, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	if st.Size() == 0 {
		return 0
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	page := int64(os.Getpagesize())
	vec := make([]byte, (st.Size()+page-1)/page)
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatalf("mincore: %v", e)
	}
	var n int64
	for _, v := range vec {
		if v&1 != 0 {
			n += page
		}
	}
	return n
}

// evict drops a file's pages from the page cache.
func evict(t testing.TB, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}

func readAll(t testing.TB, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := io.Copy(io.Discard, f)
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	return n
}

// TestMountPageCacheSharing mounts two images that share one 64 MiB file and
// reads it fully through both: the page cache holds it once, in the object.
// Measured on the object file itself (mincore), on a filesystem of the
// test's own, so that other processes cannot disturb it: after the object's
// pages are dropped, reading through either mount makes the object
// resident again, every time. A mount serving reads from a copy of its own
// (in the image, or cached above the object) would leave the object
// uncached when read again after the drop.
func TestMountPageCacheSharing(t *testing.T) {
	requireRoot(t)
	const size = 64 << 20
	dir := loopExt4(t, 3*size)
	store := filepath.Join(dir, "objects")
	content := make([]byte, size)
	block := pattern(4096, 251)
	for off := 0; off < size; off += len(block) {
		copy(content[off:], block)
		binary.LittleEndian.PutUint64(content[off:], uint64(off)) // every block distinct
	}
	d := writeObject(t, store, content)
	object := filepath.Join(store, d.ObjectPath())
	imgA, imgB := filepath.Join(dir, "a.cfs"), filepath.Join(dir, "b.cfs")
	imageWithObject(t, imgA, d, size, "only-in-a")
	imageWithObject(t, imgB, d, size, "only-in-b")
	mntA, _ := mountT(t, imgA, MountOptions{ObjectDirs: []string{store}})
	mntB, _ := mountT(t, imgB, MountOptions{ObjectDirs: []string{store}})

	for round := 1; round <= 2; round++ {
		for i, mnt := range []string{mntA, mntB} {
			evict(t, object)
			if r := residentBytes(t, object); r > size/16 {
				t.Fatalf("%.1f MiB of the object still cached after dropping its pages", mib(r))
			}
			if n := readAll(t, filepath.Join(mnt, "big")); n != size {
				t.Fatalf("read %d bytes through %s", n, mnt)
			}
			r := residentBytes(t, object)
			fmt.Printf("round %d, mount %c: reading 64 MiB through it made %.1f MiB of the object resident\n", round, 'A'+i, mib(r))
			if r < size*9/10 {
				t.Fatalf("round %d: reading 64 MiB through %s left only %.1f MiB of the object cached: the mount reads another copy", round, mnt, mib(r))
			}
		}
	}
	if !bytes.Equal(must(os.ReadFile(filepath.Join(mntB, "big")))[:4096], content[:4096]) {
		t.Fatal("content differs")
	}
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// leakCounts are the resources a mount could leak.
type leakCounts struct {
	mounts, loops, fds, tmpdirs int
}

func countLeaks(t testing.TB, under, image, tmp string) leakCounts {
	t.Helper()
	var c leakCounts
	all, err := ReadMountInfo()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range all {
		if strings.HasPrefix(m.MountPoint, under) || strings.HasPrefix(m.MountPoint, tmp) {
			c.mounts++
		}
	}
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(b)) == image {
			c.loops++
		}
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	c.fds = len(fds)
	ents, err := os.ReadDir(tmp)
	if err != nil {
		t.Fatal(err)
	}
	c.tmpdirs = len(ents)
	return c
}

// TestMountUnmountLoop mounts and unmounts 200 times, a quarter of them on
// the loop-device fallback path, and checks that no mount, loop device,
// file descriptor or temporary directory is left.
func TestMountUnmountLoop(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	tmp := filepath.Join(dir, "tmp")
	if err := os.Mkdir(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TMPDIR", tmp) // where Mount puts its private erofs directories
	image := filepath.Join(dir, "basic.cfs")
	if err := os.WriteFile(image, must(os.ReadFile(filepath.Join(goldenDir(t), "basic.cfs"))), 0o644); err != nil {
		t.Fatal(err)
	}
	store := goldenStore(t)
	target := filepath.Join(dir, "mnt")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	cleanupMount(t, target)
	before := countLeaks(t, dir, image, tmp)
	const n = 200
	paths := map[MountPath]int{}
	for i := range n {
		res, err := Mount(t.Context(), image, target, MountOptions{ObjectDirs: []string{store}, ForceLegacy: i%4 == 3})
		if err != nil {
			t.Fatalf("mount %d: %v", i, err)
		}
		paths[res.Path]++
		if i == 3 { // the counters see what a legacy mount holds
			if c := countLeaks(t, dir, image, tmp); c.loops != 1 || c.mounts != 1 || res.LoopDevice == "" {
				t.Fatalf("during a legacy mount: %+v, loop device %q; want 1 mount and 1 loop device", c, res.LoopDevice)
			}
		}
		if got := readAll(t, filepath.Join(target, "dir", "ext-4097")); got != 4097 {
			t.Fatalf("mount %d: read %d bytes", i, got)
		}
		if err := Unmount(target, false); err != nil {
			t.Fatalf("unmount %d: %v", i, err)
		}
	}
	after := countLeaks(t, dir, image, tmp)
	fmt.Printf("mount/unmount loop: %d cycles (paths %v); before %+v, after %+v\n", n, paths, before, after)
	if after != before {
		t.Fatalf("leak after %d mount/unmount cycles: before %+v, after %+v", n, before, after)
	}
}
