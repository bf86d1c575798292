package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// The guest's disk (the first virtio disk) and where it is mounted.
const (
	guestDisk = "/dev/vda"
	guestMnt  = "/mnt/disk"
)

// TestGuest is the guest's test program: it runs only inside the VM, in
// the mode the host put on the kernel command line.
func TestGuest(t *testing.T) {
	mode := os.Getenv(guestEnv)
	if mode == "" {
		t.Skip("runs inside the QEMU VM of the TestVM tests")
	}
	switch mode {
	case "verity":
		guestVerity(t)
	case "powercut":
		guestPowerCut(t)
	default:
		t.Fatalf("unknown guest mode %q", mode)
	}
}

// say writes a line for the host (the console is the test's stdout).
func say(format string, args ...any) {
	fmt.Printf(marker+format+"\n", args...)
}

// mountDisk mounts the guest's ext4 disk (replaying its journal after a
// power cut) with the mount options given.
func mountDisk(t *testing.T, options string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(guestDisk); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear", guestDisk)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := os.MkdirAll(guestMnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(guestDisk, guestMnt, "ext4", 0, options); err != nil {
		t.Fatalf("mounting %s: %v", guestDisk, err)
	}
}

func unmountDisk(t *testing.T) {
	t.Helper()
	if err := unix.Unmount(guestMnt, 0); err != nil {
		t.Errorf("unmounting %s: %v", guestMnt, err)
	}
}

// repoImage is an image published into the in-guest repository.
type repoImage struct {
	name   string
	digest cfs.Digest
	files  map[string][]byte // path in the image → content
}

// makeFiles returns n files of pseudo-random content (seeded: every boot
// makes the same), sizes from empty through inline to multi-block.
func makeFiles(seed uint64, prefix string, n, maxSize int) map[string][]byte {
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	sizes := []int{0, 1, 100, 4095, 4096, 4097, 65536, 200000}
	files := make(map[string][]byte, n)
	for i := range n {
		size := rng.IntN(maxSize + 1)
		if i < len(sizes) {
			size = min(sizes[i], maxSize)
		}
		b := make([]byte, size)
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		files[path.Join(prefix, fmt.Sprintf("d%d/f%03d", i%5, i))] = b
	}
	return files
}

// publish writes files into a fresh directory and publishes it as name in
// the repository directory repo.
func publish(t *testing.T, repo, name string, files map[string][]byte) repoImage {
	t.Helper()
	src := t.TempDir()
	for p, data := range files {
		full := filepath.Join(src, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("d0/f000", filepath.Join(src, "link")); err != nil {
		t.Fatal(err)
	}
	d, err := fetch.PublishImage(context.Background(), src, repo, name, cfs.DirOptions{UseEpoch: true}, cfs.DefaultWriteOptions())
	if err != nil {
		t.Fatal(err)
	}
	return repoImage{name: name, digest: d, files: files}
}

// serveRepo serves the repository directory on loopback (the guest has no
// other network).
func serveRepo(t *testing.T, repo string) string {
	srv := httptest.NewServer(http.FileServer(http.Dir(repo)))
	t.Cleanup(srv.Close)
	return srv.URL
}

// storeFiles lists the files under objects/ and images/ of the store at
// root, each with the digest its name says.
func storeFiles(root string) (map[string]cfs.Digest, error) {
	files := make(map[string]cfs.Digest)
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		parts := strings.Split(rel, string(filepath.Separator))
		if e.IsDir() || len(parts) < 2 {
			return nil
		}
		var d cfs.Digest
		switch {
		case parts[0] == "objects" && len(parts) == 3:
			d, err = cfs.ParseObjectPath(parts[1] + "/" + parts[2])
		case parts[0] == "images" && len(parts) == 2:
			d, err = cfs.ParseDigest(strings.TrimSuffix(parts[1], ".cfs"))
		default:
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: not named by a digest: %v", rel, err)
		}
		files[rel] = d
		return nil
	})
	return files, err
}

// checkStoreFile checks that the file has the digest its name says, read
// in userspace, and (with fs-verity) as the kernel measures it.
func checkStoreFile(path string, want cfs.Digest, verity bool) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	got, _, err := cfs.VerityDigestReader(f)
	if err != nil {
		return fmt.Errorf("reading: %w", err)
	}
	if got != want {
		return fmt.Errorf("content has digest %s", got)
	}
	if verity {
		k, err := cfs.MeasureVerity(f)
		if err != nil {
			return err
		}
		if k != want {
			return fmt.Errorf("the kernel measures %s", k)
		}
	}
	return nil
}

func dropCaches(t *testing.T) {
	t.Helper()
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200); err != nil {
		t.Fatal(err)
	}
}

// physicalBlock returns the block of the device that holds logical block
// blk of the file (FIBMAP), in units of the filesystem's block size.
func physicalBlock(t *testing.T, path string, blk int) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const fibmap = 1 // _IO(0x00, 1)
	b := int32(blk)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fibmap, uintptr(unsafe.Pointer(&b))); e != 0 {
		t.Fatalf("FIBMAP %s: %v", path, e)
	}
	if b == 0 {
		t.Fatalf("FIBMAP %s: block %d is a hole", path, blk)
	}
	return int64(b)
}

// overwriteBlock writes garbage over one block of the raw device, below
// the filesystem.
func overwriteBlock(t *testing.T, phys int64) {
	t.Helper()
	dev, err := os.OpenFile(guestDisk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	garbage := bytes.Repeat([]byte{0xa5}, 4096)
	if _, err := dev.WriteAt(garbage, phys*4096); err != nil {
		t.Fatal(err)
	}
	if err := dev.Sync(); err != nil {
		t.Fatal(err)
	}
}

func readAllFiles(t *testing.T, mnt string, files map[string][]byte, skip map[string]bool) {
	t.Helper()
	for p, want := range files {
		if skip[p] {
			continue
		}
		got, err := os.ReadFile(filepath.Join(mnt, p))
		if err != nil {
			t.Errorf("reading %s through the mount: %v", p, err)
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s through the mount: %d bytes differ from the %d published", p, len(got), len(want))
		}
	}
}

func sortedPaths(files map[string][]byte) []string {
	out := make([]string, 0, len(files))
	for p := range files {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

func guestContext(t *testing.T) context.Context {
	ctx := klog.NewContext(context.Background(), klog.Background())
	if dl, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, dl.Add(-10*time.Second))
		t.Cleanup(cancel)
	}
	return ctx
}

// isEIO reports whether err is the I/O error fs-verity and overlayfs
// answer for content that does not match its digest.
func isEIO(err error) bool { return errors.Is(err, syscall.EIO) }

// readBlock reads the block-sized range at off of the file through path.
func readBlock(path string, off int64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.ReadAt(make([]byte, 4096), off)
	if err == io.EOF {
		err = nil
	}
	return err
}
