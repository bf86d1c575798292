package vm

import (
	"io"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/driver"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

func publishRequest(volID, target string, vc map[string]string) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{
		VolumeId:   volID,
		TargetPath: target,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY},
		},
		Readonly:      true,
		VolumeContext: vc,
	}
}

// guestVerity: the store and the driver's publish path on ext4 with
// fs-verity, and what the kernel then enforces.
func guestVerity(t *testing.T) {
	ctx := guestContext(t)
	mountDisk(t, "")
	defer unmountDisk(t)
	runPkgTests(t)

	repo := t.TempDir()
	app := publish(t, repo, "app.cfs", makeFiles(1, "", 40, 300000))
	other := publish(t, repo, "other.cfs", makeFiles(2, "", 5, 10000))
	url := serveRepo(t, repo)

	root := filepath.Join(guestMnt, "store")
	st, err := fetch.Open(ctx, root, fetch.Options{MinFreeSpace: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if !st.VerityEnabled() {
		t.Fatal("the store on ext4 -O verity under a kernel with fs-verity does not enable fs-verity")
	}
	d, err := driver.New(driver.Config{NodeID: "vm", MinVerity: cfs.VerityRequire}, st)
	if err != nil {
		t.Fatalf("a driver with --min-verity=require over a store with fs-verity: %v", err)
	}
	defer d.Close()
	if err := d.Recover(ctx); err != nil {
		t.Fatal(err)
	}

	// Publish with verity=require (the node's floor).
	target := filepath.Join(t.TempDir(), "pod", "vol")
	vc := map[string]string{"repository": url, "image": app.name, "digest": app.digest.String()}
	if _, err := d.NodePublishVolume(ctx, publishRequest("v", target, vc)); err != nil {
		t.Fatalf("publish: %v", err)
	}
	say("STEP published with verity=require")
	mi, mounted, err := cfs.IsMounted(target)
	if err != nil || !mounted {
		t.Fatalf("nothing mounted at the target: %v", err)
	}
	if !strings.Contains(","+mi.SuperOpts+",", ",verity=require,") {
		t.Errorf("the overlay's options %q lack verity=require", mi.SuperOpts)
	}

	// Every stored file: the kernel's digest is its name and the userspace
	// digest.
	files, err := storeFiles(root)
	if err != nil {
		t.Fatal(err)
	}
	objects := 0
	for rel, want := range files {
		if err := checkStoreFile(filepath.Join(root, rel), want, true); err != nil {
			t.Errorf("%s: %v", rel, err)
		}
		if strings.HasPrefix(rel, "objects/") {
			objects++
		}
	}
	if objects == 0 {
		t.Fatal("no object in the store")
	}
	say("STEP %d stored files measured by the kernel (%d objects)", len(files), objects)

	// Every file reads through the mount.
	readAllFiles(t, target, app.files, nil)
	if got, err := os.Readlink(filepath.Join(target, "link")); err != nil || got != "d0/f000" {
		t.Errorf("symlink: %q, %v", got, err)
	}

	// Metrics and volume stats say the mode.
	rec := httptest.NewRecorder()
	d.HTTPHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Result().Body)
	for _, want := range []string{`csi_composefs_volumes_published_by_verity{verity="require"} 1`, "csi_composefs_store_fsverity 1"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	vs, err := d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "v", VolumePath: target})
	if err != nil {
		t.Fatal(err)
	}
	if c := vs.GetVolumeCondition(); c.GetAbnormal() || !strings.Contains(c.GetMessage(), "verity: require") {
		t.Errorf("volume condition %+v does not say verity: require", c)
	}

	// Two objects go bad under the filesystem's feet: one replaced by
	// another file with fs-verity of the same size (a tampered store),
	// one with a data block overwritten on the raw device (a bad disk).
	paths := sortedPaths(app.files)
	var tampered, corrupt string
	for _, p := range paths {
		n := len(app.files[p])
		switch {
		case corrupt == "" && n > 3*4096:
			corrupt = p
		case tampered == "" && n > 64 && n < 3*4096:
			tampered = p
		}
	}
	tamperedObj := filepath.Join(root, "objects", cfs.VerityDigestOf(app.files[tampered]).ObjectPath())
	replacement := append([]byte(nil), app.files[tampered]...)
	replacement[len(replacement)/2] ^= 0xff
	replaceWithVerity(t, tamperedObj, replacement)

	corruptObj := filepath.Join(root, "objects", cfs.VerityDigestOf(app.files[corrupt]).ObjectPath())
	phys := physicalBlock(t, corruptObj, 1)
	dropCaches(t)
	overwriteBlock(t, phys)
	dropCaches(t)
	say("STEP tampered %s, overwrote block 1 (device block %d) of %s", tampered, phys, corrupt)

	if _, err := os.ReadFile(filepath.Join(target, tampered)); !isEIO(err) {
		t.Errorf("reading %s, whose object was replaced by other content with fs-verity: %v, want EIO", tampered, err)
	}
	if _, err := os.ReadFile(filepath.Join(target, corrupt)); !isEIO(err) {
		t.Errorf("reading %s, whose object has a corrupt block: %v, want EIO", corrupt, err)
	}
	if err := readBlock(filepath.Join(target, corrupt), 1*4096); !isEIO(err) {
		t.Errorf("reading the corrupt block of %s: %v, want EIO", corrupt, err)
	}
	if _, err := os.ReadFile(corruptObj); !isEIO(err) {
		t.Errorf("reading the corrupt object in the store: %v, want EIO", err)
	}
	dropCaches(t)
	readAllFiles(t, target, app.files, map[string]bool{tampered: true, corrupt: true})
	say("STEP EIO for both bad objects; the other %d files read", len(app.files)-2)

	if _, err := d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "v", TargetPath: target}); err != nil {
		t.Fatal(err)
	}

	// A digest attribute other than the image's: refused before mount.
	target2 := filepath.Join(t.TempDir(), "pod2", "vol")
	vc2 := map[string]string{"repository": url, "image": app.name, "digest": other.digest.String()}
	_, err = d.NodePublishVolume(ctx, publishRequest("w", target2, vc2))
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("publish with another image's digest: %v, want FailedPrecondition", err)
	}
	assertNotMounted(t, target2)

	// The stored image replaced by another image's bytes, with fs-verity
	// enabled on them (a tampered store): the kernel's digest of the
	// image file is not the pinned one, and nothing is mounted.
	imgPath := st.ImagePath(app.digest)
	otherBytes, err := os.ReadFile(filepath.Join(repo, "images", other.name))
	if err != nil {
		t.Fatal(err)
	}
	replaceWithVerity(t, imgPath, otherBytes)
	target3 := filepath.Join(t.TempDir(), "pod3", "vol")
	_, err = d.NodePublishVolume(ctx, publishRequest("x", target3, vc))
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), cfs.ErrImageDigestMismatch.Error()) {
		t.Errorf("publish of a tampered stored image: %v, want FailedPrecondition: %v", err, cfs.ErrImageDigestMismatch)
	}
	assertNotMounted(t, target3)
	say("STEP mismatched image digests refused before mount")

	// The same tamper without fs-verity on the file: the store enables it,
	// finds the content is not the name, quarantines the file and fetches
	// the image again; the publish then succeeds.
	if err := os.Remove(imgPath); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(imgPath, otherBytes, 0o644); err != nil {
		t.Fatal(err)
	}
	target4 := filepath.Join(t.TempDir(), "pod4", "vol")
	if _, err := d.NodePublishVolume(ctx, publishRequest("y", target4, vc)); err != nil {
		t.Fatalf("publish after a tampered image without fs-verity: %v", err)
	}
	if err := checkStoreFile(imgPath, app.digest, true); err != nil {
		t.Errorf("the image fetched again: %v", err)
	}
	q, _ := os.ReadDir(filepath.Join(root, "quarantine"))
	if len(q) == 0 {
		t.Error("the tampered image was not quarantined")
	}
	if _, err := d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "y", TargetPath: target4}); err != nil {
		t.Fatal(err)
	}
	say("STEP a tampered image without fs-verity was quarantined and fetched again")
}

// replaceWithVerity replaces path by a new file of content b with
// fs-verity enabled, keeping the old file's extended attributes (what the
// store remembers of who showed the file: the tamper is not noticed there).
func replaceWithVerity(t *testing.T, path string, b []byte) {
	t.Helper()
	tmp := path + ".tamper"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	copyXattrs(t, path, tmp)
	f, err := os.Open(tmp)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfs.EnableVerity(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func assertNotMounted(t *testing.T, target string) {
	t.Helper()
	if _, mounted, err := cfs.IsMounted(target); err != nil || mounted {
		t.Errorf("something is mounted at %s after a refused publish (%v)", target, err)
	}
}

func copyXattrs(t *testing.T, from, to string) {
	t.Helper()
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(from, buf)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		if name == "" {
			continue
		}
		val := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(from, name, val)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Lsetxattr(to, name, val[:m], 0); err != nil {
			t.Fatal(err)
		}
	}
}

// runPkgTests runs the package tests that need fs-verity (pkgTests) with
// their temp directory on the ext4 disk, and fails unless each ran (not
// skipped) and passed.
func runPkgTests(t *testing.T) {
	t.Helper()
	tmp := filepath.Join(guestMnt, "pkgtests-tmp")
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	for _, pt := range pkgTests {
		cmd := exec.Command("/pkgtests/"+pt.bin, "-test.run", pt.run, "-test.v", "-test.count=1")
		cmd.Dir = "/tmp"
		cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
		out, err := cmd.CombinedOutput()
		os.Stdout.Write(out)
		passed := strings.Count(string(out), "--- PASS: TestKernelVerity")
		if err != nil || passed == 0 || strings.Contains(string(out), "--- SKIP") {
			t.Errorf("%s -test.run %s: %v, %d passed; a test skipped or failed", pt.bin, pt.run, err, passed)
			continue
		}
		say("STEP %s: %d tests that need fs-verity passed on this kernel", pt.pkg, passed)
	}
}
