package cfs

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseMountInfo(t *testing.T) {
	const text = `22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
45 22 0:40 / /var/lib/kubelet/pods/p\040q/volumes/x ro,nosuid,nodev,noexec,relatime shared:7 master:3 - overlay composefs:8f589e8f57ecb88823736b0d857ddca1e1068a23e264fad164b28f7038eb3682 ro,lowerdir+=/,datadir+=/srv/objects,redirect_dir=on,metacopy=on,verity=require
46 22 0:41 / /mnt/plain rw - overlay overlay rw,lowerdir=/a:/b
47 22 0:42 / /mnt/c ro - overlay composefs ro,lowerdir=/tmp/e::/o\134x
48 45 0:43 / /var/lib/kubelet/pods/p\040q/volumes/x ro - tmpfs tmpfs rw
49 22 0:44 / /mnt/d ro - overlay composefs ro,lowerdir+=/e,datadir+=/obj\054verity=require\054x\134,redirect_dir=on
`
	ms, err := ParseMountInfo(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 6 {
		t.Fatalf("%d entries", len(ms))
	}
	cfs := ms[1]
	if cfs.MountPoint != "/var/lib/kubelet/pods/p q/volumes/x" || cfs.ID != 45 || cfs.ParentID != 22 ||
		len(cfs.Optional) != 2 || cfs.FSType != "overlay" {
		t.Errorf("entry: %+v", cfs)
	}
	if !cfs.IsComposefs() || cfs.Verity() != VerityRequire || !cfs.HasOption("noexec") {
		t.Errorf("composefs entry misread: %+v", cfs)
	}
	if d, ok := cfs.ImageDigest(); !ok || !strings.HasPrefix(d.String(), "8f589e8f") {
		t.Errorf("digest %v %v", d, ok)
	}
	if ms[2].IsComposefs() || ms[0].IsComposefs() {
		t.Error("plain mounts taken for composefs")
	}
	if !ms[3].IsComposefs() || !ms[3].HasOption(`lowerdir=/tmp/e::/o\x`) {
		t.Errorf("entry 3: %+v", ms[3])
	}
	// A comma inside a path is one option, not a forged verity=require.
	if ms[5].Verity() != "" || !ms[5].HasOption(`datadir+=/obj,verity=require,x\`) || !ms[5].HasOption("redirect_dir=on") {
		t.Errorf("entry 5: verity %q, options %q", ms[5].Verity(), ms[5].SuperOpts)
	}
	if _, ok := ms[3].ImageDigest(); ok {
		t.Error("digest from a plain composefs source")
	}
	top, ok, err := topMountAt(ms, "/var/lib/kubelet/pods/p q/volumes/x")
	if err != nil || !ok || top.ID != 48 {
		t.Errorf("top mount %+v %v %v", top, ok, err)
	}
	if _, err := ParseMountInfo(strings.NewReader("1 2 3\n")); err == nil {
		t.Error("malformed line accepted")
	}
}

// TestIsMountedSymlinkTarget: a symlink to a mount point is not itself a
// mount point (Mount and Unmount act on the link), while a symlinked parent
// directory is resolved as the kernel shows mount points.
func TestIsMountedSymlinkTarget(t *testing.T) {
	requireRoot(t)
	base := t.TempDir()
	mnt := filepath.Join(base, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(goldenDir(t), "minimal.cfs")
	if _, err := Mount(context.Background(), img, mnt, MountOptions{ObjectDirs: []string{t.TempDir()}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Unmount(mnt, true) })
	link := filepath.Join(base, "link")
	if err := os.Symlink(mnt, link); err != nil {
		t.Fatal(err)
	}
	parentLink := filepath.Join(t.TempDir(), "base")
	if err := os.Symlink(base, parentLink); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		path string
		want bool
	}{{mnt, true}, {link, false}, {filepath.Join(parentLink, "mnt"), true}} {
		_, got, err := IsMounted(tt.path)
		if err != nil || got != tt.want {
			t.Errorf("IsMounted(%s) = %v, %v; want %v", tt.path, got, err, tt.want)
		}
	}
}
