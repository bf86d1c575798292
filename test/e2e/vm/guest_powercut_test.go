package vm

import (
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// Environment of the power-cut guest (on the kernel command line).
const (
	bootEnv   = "CSI_COMPOSEFS_VM_BOOT"          // the boot's number
	noSyncEnv = "CSI_COMPOSEFS_VM_UNSAFE_NOSYNC" // "1": the store never syncs (to show the test fails then)
)

// powerCutImages are the images the power-cut guest pulls, the same at
// every boot: about 13 MB of objects, a third of the second image shared
// with the first.
func powerCutImages(t *testing.T, repo string) []repoImage {
	a := makeFiles(10, "a", 24, 400000)
	b := makeFiles(11, "b", 16, 400000)
	n := 0
	for p, data := range a {
		if n%3 == 0 {
			b["shared/"+filepath.Base(p)] = data
		}
		n++
	}
	c := makeFiles(12, "c", 24, 400000)
	maps.Copy(c, makeFiles(13, "c/small", 40, 3000))
	return []repoImage{publish(t, repo, "a.cfs", a), publish(t, repo, "b.cfs", b), publish(t, repo, "c.cfs", c)}
}

// guestPowerCut checks the store a power cut may have interrupted, then
// pulls, collects and pulls again until the host cuts the power (final:
// pulls every image once to completion and checks again).
func guestPowerCut(t *testing.T, final bool) {
	ctx := guestContext(t)
	mountDisk(t)
	defer unmountDisk(t)
	boot, _ := strconv.Atoi(os.Getenv(bootEnv))
	repo := t.TempDir()
	images := powerCutImages(t, repo)
	src, err := fetch.NewHTTPSource(serveRepo(t, repo), fetch.HTTPOptions{})
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(guestMnt, "store")
	leftovers := countFiles(filepath.Join(root, "tmp"))
	opts := fetch.Options{
		MinFreeSpace:   -1,
		MaxSize:        1, // every collection removes every image and object
		GCGrace:        -1,
		NamedTempFiles: boot%2 == 1, // both ways of writing objects
		UnsafeNoSync:   os.Getenv(noSyncEnv) == "1",
	}
	st, err := fetch.Open(ctx, root, opts)
	if err != nil {
		say("CHECK-FAIL opening the store: %v", err)
		t.Fatal(err)
	}
	defer st.Close()
	if !st.VerityEnabled() {
		say("CHECK-FAIL the store has no fs-verity")
		t.Fatal("no fs-verity")
	}
	check := func(when string) {
		t.Helper()
		if n := countFiles(filepath.Join(root, "tmp")); n != 0 {
			say("CHECK-FAIL %s: %d files in tmp/ after open", when, n)
			t.Errorf("%d files in tmp/", n)
		}
		files, err := storeFiles(root)
		if err != nil {
			say("CHECK-FAIL %s: %v", when, err)
			t.Fatal(err)
		}
		bad := 0
		for rel, want := range files {
			if err := checkStoreFile(filepath.Join(root, rel), want, true); err != nil {
				bad++
				say("CHECK-FAIL %s: %s: %v", when, rel, err)
				t.Errorf("%s: %v", rel, err)
			}
		}
		say("CHECK %s boot=%d files=%d bad=%d tmpLeftovers=%d namedTemp=%v", when, boot, len(files), bad, leftovers, opts.NamedTempFiles)
	}
	check("at-open")
	pull := func() {
		t.Helper()
		for _, img := range images {
			d, err := st.EnsureImage(ctx, src, fetch.ImageRef{Name: img.name, Digest: img.digest})
			if err != nil {
				say("PULL-FAIL %s: %v", img.name, err)
				t.Fatal(err)
			}
			if _, err := st.EnsureObjects(ctx, src, d); err != nil {
				say("PULL-FAIL %s: %v", img.name, err)
				t.Fatal(err)
			}
		}
	}
	if final {
		pull()
		check("after-pull")
		say("FINAL pulled %d images", len(images))
		return
	}
	say("PULLING")
	for round := 0; ctx.Err() == nil; round++ {
		pull()
		say("ROUND %d pulled", round)
		if _, err := st.GC(ctx); err != nil {
			t.Fatal(err)
		}
		say("ROUND %d collected", round)
	}
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
