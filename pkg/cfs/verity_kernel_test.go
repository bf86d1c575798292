package cfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseVerityMode(t *testing.T) {
	for in, want := range map[string]VerityMode{"require": VerityRequire, "userspace": VerityUserspace, "off": VerityOff, "": VerityOff} {
		if got, err := ParseVerityMode(in); err != nil || got != want {
			t.Errorf("ParseVerityMode(%q) = %q, %v", in, got, err)
		}
	}
	for _, in := range []string{"on", "Require", "try"} {
		if _, err := ParseVerityMode(in); err == nil {
			t.Errorf("ParseVerityMode(%q) succeeded", in)
		}
	}
}

// TestKernelVerity checks the fs-verity ioctls where the test directory's
// filesystem has fs-verity, and the "not supported" errors where it has not
// (as on a kernel without CONFIG_FS_VERITY).
func TestKernelVerity(t *testing.T) {
	dir := t.TempDir()
	supported, err := VeritySupport(dir)
	if err != nil {
		t.Fatalf("VeritySupport: %v", err)
	}
	t.Logf("fs-verity under the test directory: %v", supported)
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("the probe left %d files behind", len(ents))
	}
	content := pattern(10000, 251)
	name := filepath.Join(dir, "obj")
	if err := os.WriteFile(name, content, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !supported {
		if err := EnableVerity(f); !errors.Is(err, ErrVerityUnsupported) || !strings.Contains(err.Error(), "not supported") {
			t.Errorf("EnableVerity = %v, want an error wrapping ErrVerityUnsupported", err)
		}
		if _, err := MeasureVerity(f); !errors.Is(err, ErrVerityUnsupported) {
			t.Errorf("MeasureVerity = %v, want an error wrapping ErrVerityUnsupported", err)
		}
		return
	}
	if _, err := MeasureVerity(f); !errors.Is(err, ErrVerityNotEnabled) {
		t.Errorf("MeasureVerity before enabling = %v, want ErrVerityNotEnabled", err)
	}
	if err := EnableVerity(f); err != nil {
		t.Fatal(err)
	}
	if err := EnableVerity(f); err != nil {
		t.Errorf("enabling twice: %v", err)
	}
	got, err := MeasureVerity(f)
	if err != nil || got != VerityDigestOf(content) {
		t.Errorf("MeasureVerity = %v, %v; want %v", got, err, VerityDigestOf(content))
	}
}

// TestMountVerityRequire: verity=require is decided from the store, never
// from whether the mount succeeds; where the store has no fs-verity the
// mount is refused before anything is mounted.
func TestMountVerityRequire(t *testing.T) {
	requireRoot(t)
	store := goldenStore(t)
	image := filepath.Join(goldenDir(t), "basic.cfs")
	target := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	cleanupMount(t, target)
	ctx := context.Background()
	if _, err := Mount(ctx, image, target, MountOptions{ObjectDirs: []string{store}, Verity: VerityRequire}); err == nil {
		t.Fatal("verity=require without an image digest mounted")
	}
	supported, err := VeritySupport(store)
	if err != nil {
		t.Fatal(err)
	}
	if supported {
		t.Skip("the store has fs-verity here; the refusal path is not reachable")
	}
	d := VerityDigestOf(must(os.ReadFile(image)))
	_, err = Mount(ctx, image, target, MountOptions{ObjectDirs: []string{store}, Verity: VerityRequire, ImageDigest: &d})
	if !errors.Is(err, ErrVerityUnsupported) {
		t.Fatalf("verity=require on a store without fs-verity: %v, want ErrVerityUnsupported", err)
	}
	t.Logf("refused: %v", err)
	if _, ok, _ := IsMounted(target); ok {
		t.Fatal("the refused mount left something mounted")
	}
}
