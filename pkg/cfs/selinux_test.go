package cfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheckSELinuxContext(t *testing.T) {
	for _, ok := range []string{
		"system_u:object_r:container_file_t:s0:c15,c25", // what the kubelet passes
		"system_u:object_r:container_file_t:s0",
		"system_u:object_r:container_file_t:s0-s0:c0.c1023",
		"user_u:object_r:svirt_sandbox_file_t", // a policy without MLS
	} {
		if err := CheckSELinuxContext(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{
		"",
		"container_file_t",
		"a:b",
		"a::c",
		"a:b:c:",
		"a,b:r:t",
		`system_u:object_r:container_file_t:s0",upperdir=/x`, // would escape the quotes of the legacy option string
		"system_u:object_r:container_file_t:s0 c1",
		"system_u:object_r:t=x",
		"system_u:object_r:container_file_t\x00",
		strings.Repeat("a:", 200) + "a",
	} {
		if err := CheckSELinuxContext(bad); !errors.Is(err, ErrInvalidSELinuxContext) {
			t.Errorf("%q: %v, want ErrInvalidSELinuxContext", bad, err)
		}
	}
}

// TestMountSELinuxContext: an invalid context is refused before anything is
// mounted; on a kernel without SELinux (this machine and CI) a valid one
// makes both mount paths fail with an error that says so, leaving nothing
// mounted; with SELinux the files carry the label.
func TestMountSELinuxContext(t *testing.T) {
	ctx := context.Background()
	target := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	image := filepath.Join(goldenDir(t), "basic.cfs")
	if _, err := Mount(ctx, image, target, MountOptions{ObjectDirs: []string{t.TempDir()}, SELinuxContext: `a:b:c",rw`}); !errors.Is(err, ErrInvalidSELinuxContext) {
		t.Errorf("invalid context: %v, want ErrInvalidSELinuxContext", err)
	}
	requireRoot(t)
	store := goldenStore(t)
	cleanupMount(t, target)
	const label = "system_u:object_r:container_file_t:s0:c15,c25"
	for _, legacy := range []bool{false, true} {
		_, err := Mount(ctx, image, target, MountOptions{ObjectDirs: []string{store}, SELinuxContext: label, ForceLegacy: legacy})
		if SELinuxEnabled() {
			if err != nil {
				t.Fatalf("legacy=%v: %v", legacy, err)
			}
			mi, _, _ := IsMounted(target)
			if !strings.Contains(mi.SuperOpts, "context=") {
				t.Errorf("legacy=%v: super options %q lack context=", legacy, mi.SuperOpts)
			}
			if err := Unmount(target, false); err != nil {
				t.Fatal(err)
			}
			continue
		}
		t.Logf("legacy=%v without SELinux: %v", legacy, err)
		if err == nil || !strings.Contains(err.Error(), "SELinux") {
			t.Errorf("legacy=%v on a kernel without SELinux: %v, want an error naming SELinux", legacy, err)
		}
		if _, mounted, _ := IsMounted(target); mounted {
			t.Fatalf("legacy=%v: a refused mount left something mounted", legacy)
		}
	}
}

// FuzzCheckSELinuxContext: an accepted context cannot leave the quotes of
// the legacy option string nor add an option: no quote, no '=', no
// whitespace or control byte, and user:role:type present.
func FuzzCheckSELinuxContext(f *testing.F) {
	for _, s := range []string{"system_u:object_r:container_file_t:s0:c15,c25", "a:b:c", `a:b:c",rw`, "a:b:c=d", "::", "a:b:c:s0-s0:c0.c1023"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if CheckSELinuxContext(s) != nil {
			return
		}
		if strings.ContainsAny(s, "\"=\\ \t\n\x00") || len(s) > maxSELinuxContext {
			t.Fatalf("accepted %q", s)
		}
		if p := strings.SplitN(s, ":", 4); len(p) < 3 || p[0] == "" || p[1] == "" || p[2] == "" {
			t.Fatalf("accepted %q without user:role:type", s)
		}
		for _, opt := range strings.Split(`context="`+s+`"`, ",") {
			if strings.Contains(opt, "=") && !strings.HasPrefix(opt, `context="`) {
				t.Fatalf("%q adds the option %q", s, opt)
			}
		}
	})
}
