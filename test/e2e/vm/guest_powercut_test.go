package vm

import (
	"bufio"
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// noSyncEnv set to 1 makes the power-cut test run its stores without any
// sync, to show that it fails then.
const noSyncEnv = "CSI_COMPOSEFS_VM_UNSAFE_NOSYNC"

// powerCutImages are the images the power-cut guest pulls, the same at
// every boot: about 4 MB of objects (a pull round takes about a second),
// a third of the second image shared with the first.
func powerCutImages(t *testing.T, repo string) []repoImage {
	a := makeFiles(10, "a", 12, 200000)
	b := makeFiles(11, "b", 8, 200000)
	for i, p := range sortedPaths(a) {
		if i%3 == 0 {
			b["shared/"+filepath.Base(p)] = a[p]
		}
	}
	c := makeFiles(12, "c", 12, 200000)
	maps.Copy(c, makeFiles(13, "c/small", 30, 3000))
	return []repoImage{publish(t, repo, "a.cfs", a), publish(t, repo, "b.cfs", b), publish(t, repo, "c.cfs", c)}
}

// powerCutStore is one of the two stores on the guest's disk: one with
// fs-verity (a node whose kernel has it), one without (a node whose
// kernel lacks it: there the store's own syncs are all that makes files
// durable).
type powerCutStore struct {
	dir    string
	verity bool
}

var powerCutStores = []powerCutStore{{"store-verity", true}, {"store-plain", false}}

// guestPowerCut sets up (the repository, served on loopback), says READY
// and waits for a command on the console: the host saves the VM's state
// there once and resumes it for every run, so no run pays for a boot.
// "RUN powercut BOOT [nosync]" checks both stores a power cut may have
// interrupted, then pulls into one of them (by boot, and by boot writing
// objects to anonymous or to named temporary files), collects and pulls
// again until the host cuts the power; "RUN final BOOT [nosync]" pulls
// every image once into each store and checks again.
func guestPowerCut(t *testing.T) {
	ctx := guestContext(t)
	repo := t.TempDir()
	images := powerCutImages(t, repo)
	src, err := fetch.NewHTTPSource(serveRepo(t, repo), fetch.HTTPOptions{})
	if err != nil {
		t.Fatal(err)
	}
	say("READY")
	// The host types the command until the guest answers STARTED (the
	// console drops what arrives while the VM resumes): the first whole
	// RUN line counts, anything else is skipped.
	in := bufio.NewReader(os.Stdin)
	var f []string
	var line string
	for {
		line, err = in.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the command: %v", err)
		}
		f = strings.Fields(line)
		if len(f) >= 3 && f[0] == "RUN" && (f[1] == "powercut" || f[1] == "final") {
			break
		}
	}
	final := f[1] == "final"
	boot, err := strconv.Atoi(f[2])
	if err != nil {
		t.Fatalf("command %q: %v", line, err)
	}
	noSync := len(f) > 3 && f[3] == "nosync"
	say("STARTED %s boot=%d nosync=%v", f[1], boot, noSync)

	// The kernel read the disk's first blocks when it found the disk,
	// before the state was saved: drop them, the disk has changed since.
	forgetDiskCache(t)
	// The journal commits every second (not every 5): metadata, such as a
	// file's name, reaches the disk long before data nobody synced (30 s),
	// so a store that does not sync is caught within a few seconds.
	mountDisk(t, "commit=1")
	defer unmountDisk(t)
	open := func(s powerCutStore, named bool) *fetch.Store {
		t.Helper()
		st, err := fetch.Open(ctx, filepath.Join(guestMnt, s.dir), fetch.Options{
			MinFreeSpace:   -1,
			MaxSize:        1, // every collection removes every image and object
			GCGrace:        -1,
			DisableVerity:  !s.verity,
			NamedTempFiles: named,
			UnsafeNoSync:   noSync,
		})
		if err != nil {
			say("CHECK-FAIL opening %s: %v", s.dir, err)
			t.Fatal(err)
		}
		if st.VerityEnabled() != s.verity {
			say("CHECK-FAIL %s: fs-verity %v", s.dir, st.VerityEnabled())
			t.Fatal("fs-verity not as wanted")
		}
		return st
	}
	check := func(s powerCutStore, when string, leftovers int) {
		t.Helper()
		root := filepath.Join(guestMnt, s.dir)
		if n := countFiles(filepath.Join(root, "tmp")); n != 0 {
			say("CHECK-FAIL %s %s: %d files in tmp/ after open", s.dir, when, n)
			t.Errorf("%d files in tmp/", n)
		}
		files, err := storeFiles(root)
		if err != nil {
			say("CHECK-FAIL %s %s: %v", s.dir, when, err)
			t.Fatal(err)
		}
		bad := 0
		for rel, want := range files {
			if err := checkStoreFile(filepath.Join(root, rel), want, s.verity); err != nil {
				bad++
				say("CHECK-FAIL %s %s: %s: %v", s.dir, when, rel, err)
				t.Errorf("%s: %v", rel, err)
			}
		}
		say("CHECK %s %s boot=%d files=%d bad=%d tmpLeftovers=%d", s.dir, when, boot, len(files), bad, leftovers)
	}
	pull := func(st *fetch.Store) {
		t.Helper()
		for _, img := range images {
			if err := pullImage(ctx, st, src, img); err != nil {
				say("PULL-FAIL %v", err)
				t.Fatal(err)
			}
		}
	}
	for _, s := range powerCutStores {
		leftovers := countFiles(filepath.Join(guestMnt, s.dir, "tmp"))
		st := open(s, false)
		check(s, "at-open", leftovers)
		if final {
			pull(st)
			check(s, "after-pull", 0)
		}
		st.Close()
	}
	if final {
		say("FINAL pulled %d images into each store", len(images))
		return
	}
	s := powerCutStores[boot%2]
	named := (boot/2)%2 == 1
	st := open(s, named)
	defer st.Close()
	say("PULLING into %s (named temporary files: %v)", s.dir, named)
	for round := 0; ctx.Err() == nil; round++ {
		pull(st)
		say("ROUND %d pulled", round)
		if _, err := st.GC(ctx); err != nil {
			t.Fatal(err)
		}
		say("ROUND %d collected", round)
	}
}

func pullImage(ctx context.Context, st *fetch.Store, src fetch.Source, img repoImage) error {
	d, err := st.EnsureImage(ctx, src, fetch.ImageRef{Name: img.name, Digest: img.digest})
	if err != nil {
		return fmt.Errorf("%s: %w", img.name, err)
	}
	if _, err := st.EnsureObjects(ctx, src, d); err != nil {
		return fmt.Errorf("%s: %w", img.name, err)
	}
	return nil
}

// countFiles counts the files (not directories) under dir.
func countFiles(dir string) int {
	n := 0
	_ = filepath.WalkDir(dir, func(_ string, e os.DirEntry, err error) error {
		if err == nil && !e.IsDir() {
			n++
		}
		return nil
	})
	return n
}

// forgetDiskCache drops what the kernel cached of the disk's blocks
// (BLKFLSBUF) and the page cache.
func forgetDiskCache(t *testing.T) {
	t.Helper()
	dev, err := os.Open(guestDisk)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if err := unix.IoctlSetInt(int(dev.Fd()), unix.BLKFLSBUF, 0); err != nil {
		t.Fatalf("BLKFLSBUF %s: %v", guestDisk, err)
	}
	dropCaches(t)
}
