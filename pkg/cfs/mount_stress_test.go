package cfs

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
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

// meminfoCached returns the "Cached:" figure of /proc/meminfo in bytes.
func meminfoCached(t testing.TB) int64 {
	t.Helper()
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "Cached:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no Cached: line in /proc/meminfo")
	return 0
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
func TestMountPageCacheSharing(t *testing.T) {
	requireRoot(t)
	const size = 64 << 20
	dir := t.TempDir()
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Type == unix.TMPFS_MAGIC {
		t.Skip("skipped: the temporary directory is on tmpfs, whose files always sit in the page cache; set TMPDIR to a disk filesystem")
	}
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

	// Another process may fill the cache at the same moment: measure again
	// when the growth looks like more than one copy.
	var growA, growB int64
	for attempt := 1; attempt <= 3; attempt++ {
		evict(t, object)
		if r := residentBytes(t, object); r > size/8 {
			t.Logf("attempt %d: %d bytes still cached after eviction", attempt, r)
		}
		c0 := meminfoCached(t)
		if n := readAll(t, filepath.Join(mntA, "big")); n != size {
			t.Fatalf("read %d bytes through the first mount", n)
		}
		c1 := meminfoCached(t)
		if n := readAll(t, filepath.Join(mntB, "big")); n != size {
			t.Fatalf("read %d bytes through the second mount", n)
		}
		c2 := meminfoCached(t)
		growA, growB = c1-c0, c2-c1
		resident := residentBytes(t, object)
		fmt.Printf("page cache: +%.1f MiB reading 64 MiB through mount A, +%.1f MiB more through mount B (total +%.1f MiB for two mounts of one 64 MiB file); object resident %.1f MiB\n",
			mib(growA), mib(growB), mib(growA+growB), mib(resident))
		if resident < size*9/10 {
			t.Fatalf("only %.1f MiB of the object are cached after reading it: reads did not go to the shared object", mib(resident))
		}
		if growA+growB < size*3/2 && growB < size/2 {
			break
		}
		if attempt == 3 {
			t.Fatalf("the page cache grew by %.1f MiB for two reads of one shared 64 MiB file: about two copies", mib(growA+growB))
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
