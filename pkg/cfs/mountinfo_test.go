package cfs

import (
	"strings"
	"testing"
)

func TestParseMountInfo(t *testing.T) {
	const text = `22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
45 22 0:40 / /var/lib/kubelet/pods/p\040q/volumes/x ro,nosuid,nodev,noexec,relatime shared:7 master:3 - overlay composefs:8f589e8f57ecb88823736b0d857ddca1e1068a23e264fad164b28f7038eb3682 ro,lowerdir+=/,datadir+=/srv/objects,redirect_dir=on,metacopy=on,verity=require
46 22 0:41 / /mnt/plain rw - overlay overlay rw,lowerdir=/a:/b
47 22 0:42 / /mnt/c ro - overlay composefs ro,lowerdir=/tmp/e::/o\134x
48 45 0:43 / /var/lib/kubelet/pods/p\040q/volumes/x ro - tmpfs tmpfs rw
`
	ms, err := ParseMountInfo(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 5 {
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
	if !ms[3].IsComposefs() || ms[3].SuperOpts != `ro,lowerdir=/tmp/e::/o\x` {
		t.Errorf("entry 3: %+v", ms[3])
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
