package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

func TestImageMountUsage(t *testing.T) {
	img := filepath.Join("..", "..", "testdata", "composefs", "minimal.cfs")
	dir := t.TempDir()
	for _, args := range [][]string{
		{"image", "mount", img, dir},                                        // no --objects
		{"image", "mount", "--objects", dir, img},                           // one argument
		{"image", "mount", "--objects", dir, "--verity", "maybe", img, dir}, // bad mode
		{"image", "mount", "--objects", dir, "--digest", "abc", img, dir},   // bad digest
		{"image", "umount"},                                                 // no target
		{"image", "umount", dir, dir},                                       // two targets
		{"image", "mount", "--objects", dir, "--no-such-flag", img, dir},    // unknown flag
	} {
		if code := run(args); code != exitUsage {
			t.Errorf("%q: exit %d, want %d", args, code, exitUsage)
		}
	}
}

func TestImageMountAndUmount(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipped: needs root to mount erofs and overlayfs for real (CI runs as root)")
	}
	img := filepath.Join("..", "..", "testdata", "composefs", "minimal.cfs")
	digest := strings.TrimSpace(string(mustRead(t, filepath.Join("..", "..", "testdata", "composefs", "minimal.digest"))))
	objects := t.TempDir()
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cfs.Unmount(mnt, false); err != nil {
			cfs.Unmount(mnt, true)
		}
	})
	for _, legacy := range []string{"--legacy=false", "--legacy=true"} {
		if code := run([]string{"image", "mount", "--objects", objects, "--objects", t.TempDir(), "--digest", digest, legacy, img, mnt}); code != exitOK {
			t.Fatalf("mount %s: exit %d", legacy, code)
		}
		mi, ok, err := cfs.IsMounted(mnt)
		if err != nil || !ok || !mi.IsComposefs() || mi.Source != "composefs:"+digest {
			t.Fatalf("after mount: %+v %v %v", mi, ok, err)
		}
		if code := run([]string{"image", "mount", "--objects", objects, img, mnt}); code != exitFailure {
			t.Errorf("mounting over a mount: exit %d, want %d", code, exitFailure)
		}
		if code := run([]string{"image", "umount", mnt}); code != exitOK {
			t.Fatalf("umount: exit %d", code)
		}
		if _, ok, _ := cfs.IsMounted(mnt); ok {
			t.Fatal("still mounted after umount")
		}
		if code := run([]string{"image", "umount", "--lazy", mnt}); code != exitOK {
			t.Errorf("umount of an unmounted target: exit %d", code)
		}
	}
	if code := run([]string{"image", "mount", "--objects", objects, "--verity", "require", "--digest", digest, img, mnt}); code != exitFailure {
		t.Errorf("verity=require without fs-verity in the store: exit %d, want %d", code, exitFailure)
	}
	if code := run([]string{"image", "mount", "--objects", objects, filepath.Join(objects, "missing.cfs"), mnt}); code != exitFailure {
		t.Errorf("missing image: exit %d, want %d", code, exitFailure)
	}
}

func mustRead(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
