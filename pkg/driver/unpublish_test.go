package driver

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// TestUnpublishRemovesOnlyWhatItCreated: unpublish never removes a regular
// file or a symlink it did not create, never follows a symlink, leaves a
// directory that was there before publish (with its content) and answers
// OK; the directory it created itself goes.
func TestUnpublishRemovesOnlyWhatItCreated(t *testing.T) {
	needRoot(t)
	e, repo, created, dg := publishSample(t, 41)
	ctx := context.Background()
	vc := map[string]string{"repository": repo.srv.URL, "digest": dg.String()}

	// A directory that existed, not empty, before the publish.
	existing := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, existing)
	if err := os.MkdirAll(existing, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(existing, "keep"), []byte("not the driver's"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodePublishVolume(ctx, publishReq("v", existing, vc)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(existing, "bin/app")); err != nil {
		t.Fatalf("not mounted over the existing directory: %v", err)
	}
	for i := 0; i < 2; i++ {
		if _, err := e.d.NodeUnpublishVolume(ctx, unpublishReq("v", existing)); err != nil {
			t.Fatalf("unpublish %d of a pre-existing directory: %v", i, err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(existing, "keep")); err != nil || string(b) != "not the driver's" {
		t.Errorf("the pre-existing directory's file: %q, %v", b, err)
	}
	if _, mounted, _ := cfs.IsMounted(existing); mounted {
		t.Error("still mounted")
	}

	// An empty directory that existed before the publish stays too.
	empty := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, empty)
	if err := os.Mkdir(empty, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodePublishVolume(ctx, publishReq("v", empty, vc)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodeUnpublishVolume(ctx, unpublishReq("v", empty)); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(empty); err != nil || !fi.IsDir() {
		t.Errorf("the empty directory that was there before: %v, %v", fi, err)
	}

	// The directory the driver created goes.
	if _, err := e.d.NodeUnpublishVolume(ctx, unpublishReq("v", created)); err != nil {
		t.Fatal(err)
	}
	assertClean(t, e, created)

	// A regular file, and a symlink to a file outside, the driver never made.
	outside := filepath.Join(t.TempDir(), "precious")
	if err := os.WriteFile(outside, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	file, link := filepath.Join(dir, "file"), filepath.Join(dir, "link")
	if err := os.WriteFile(file, []byte("a file"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, link); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{file, link} {
		if _, err := e.d.NodePublishVolume(ctx, publishReq("v", p, vc)); status.Code(err) != codes.FailedPrecondition {
			t.Errorf("publish at %s: %v, want FailedPrecondition", p, err)
		}
		if _, err := e.d.NodeUnpublishVolume(ctx, unpublishReq("v", p)); err != nil {
			t.Errorf("unpublish of %s: %v, want OK", p, err)
		}
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "a file" {
		t.Errorf("the regular file: %q, %v", b, err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&fs.ModeSymlink == 0 {
		t.Errorf("the symlink: %v, %v", fi, err)
	}
	if b, err := os.ReadFile(outside); err != nil || string(b) != "precious" {
		t.Errorf("the file the symlink points to: %q, %v", b, err)
	}

	// The target the driver created, replaced by a symlink meanwhile: the
	// symlink stays and is not followed.
	target := filepath.Join(t.TempDir(), "vol")
	if _, err := e.d.NodePublishVolume(ctx, publishReq("v", target, vc)); err != nil {
		t.Fatal(err)
	}
	if err := cfs.Unmount(target, false); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(target); err != nil {
		t.Fatal(err)
	}
	outDir := t.TempDir() // an empty directory elsewhere: rmdir through a link would remove it
	if err := os.Symlink(outDir, target); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodeUnpublishVolume(ctx, unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(target); err != nil || fi.Mode()&fs.ModeSymlink == 0 {
		t.Errorf("the symlink at the target: %v, %v", fi, err)
	}
	if _, err := os.Stat(outDir); err != nil {
		t.Errorf("the directory behind the symlink: %v", err)
	}
	if p := e.store.Pinned(); len(p) != 0 {
		t.Errorf("pins left: %v", p)
	}
}

// TestUnpublishBusyTargetIsRetryable: a process holding a file of the
// volume makes unpublish answer Unavailable, leaving the mount, its pin and
// its record; once the file is closed, unpublish succeeds.
func TestUnpublishBusyTargetIsRetryable(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "app", sampleFiles(42))
	// GC with a budget of one byte and no grace deletes all it may.
	e := &testEnv{t: t, root: t.TempDir(), storeOpts: fetch.Options{MaxSize: 1, GCGrace: 1}}
	e.open(Config{})
	ctx := context.Background()
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	if _, err := e.d.NodePublishVolume(ctx, publishReq("v", target, map[string]string{"repository": repo.srv.URL, "digest": dg.String()})); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(target, "bin/app"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, err = e.d.NodeUnpublishVolume(ctx, unpublishReq("v", target))
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "a process still uses the volume") {
		t.Fatalf("unpublish while a file is open: %v, want Unavailable saying a process uses it", err)
	}
	if _, mounted, _ := cfs.IsMounted(target); !mounted {
		t.Fatal("the busy mount was detached")
	}
	if p := e.store.Pinned(); p[dg] != 1 {
		t.Errorf("pins %v, want the image still pinned", p)
	}
	if _, ok := e.d.state.get(target); !ok {
		t.Error("the record is gone")
	}
	// GC keeps the pinned content: a file opened now still reads.
	if st, err := e.d.RunGC(ctx); err != nil || st.ImagesRemoved != 0 || st.ObjectsRemoved != 0 {
		t.Fatalf("GC removed %+v (%v) of a busy volume", st, err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "lib/shared0.so")); err != nil || string(b) != sampleFiles(42)["lib/shared0.so"] {
		t.Fatalf("reading the busy volume after GC: %v", err)
	}
	f.Close()
	if _, err := e.d.NodeUnpublishVolume(ctx, unpublishReq("v", target)); err != nil {
		t.Fatalf("unpublish after the file was closed: %v", err)
	}
	assertClean(t, e, target)
}

// TestVolumeIDAndCompatibility: unpublish with another volume's id leaves
// the mount (NotFound); a republish at a target with another volume id, or
// other mount flags, access mode or readonly, is AlreadyExists.
func TestVolumeIDAndCompatibility(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "app", sampleFiles(43))
	e := newTestEnv(t, Config{})
	ctx := context.Background()
	vc := map[string]string{"repository": repo.srv.URL, "digest": dg.String()}
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	req := func(volID string, edit func(*csi.NodePublishVolumeRequest)) *csi.NodePublishVolumeRequest {
		r := publishReq(volID, target, vc)
		r.VolumeCapability.GetMount().MountFlags = []string{"noexec", "ro"}
		if edit != nil {
			edit(r)
		}
		return r
	}
	if _, err := e.d.NodePublishVolume(ctx, req("v1", nil)); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name  string
		volID string
		edit  func(*csi.NodePublishVolumeRequest)
		code  codes.Code
	}{
		{"same", "v1", nil, codes.OK},
		{"same flags in another order, repeated", "v1", func(r *csi.NodePublishVolumeRequest) {
			r.VolumeCapability.GetMount().MountFlags = []string{"ro", "noexec", "ro"}
		}, codes.OK},
		{"another volume id", "v2", nil, codes.AlreadyExists},
		{"without noexec", "v1", func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().MountFlags = []string{"ro"} }, codes.AlreadyExists},
		{"another access mode", "v1", func(r *csi.NodePublishVolumeRequest) {
			r.VolumeCapability.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
		}, codes.AlreadyExists},
		{"readonly false", "v1", func(r *csi.NodePublishVolumeRequest) { r.Readonly = false }, codes.AlreadyExists},
	} {
		if _, err := e.d.NodePublishVolume(ctx, req(tt.volID, tt.edit)); status.Code(err) != tt.code {
			t.Errorf("republish %s: %v, want %v", tt.name, err, tt.code)
		}
	}

	_, err := e.d.NodeUnpublishVolume(ctx, unpublishReq("v2", target))
	if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), "v2 is not published") {
		t.Fatalf("unpublish with another volume id: %v, want NotFound", err)
	}
	if _, err := os.Stat(filepath.Join(target, "bin/app")); err != nil {
		t.Fatalf("the volume was unmounted by another volume's unpublish: %v", err)
	}

	// A record written before the publish parameters were kept: the
	// mount's own noexec is compared.
	e.close()
	stateFile := filepath.Join(e.root, "csi-state", stateFile(target))
	var raw map[string]any
	b, err := os.ReadFile(stateFile)
	if err == nil {
		err = json.Unmarshal(b, &raw)
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := raw["publish"]; !ok {
		t.Fatalf("the record keeps no publish parameters: %s", b)
	}
	delete(raw, "publish")
	if b, err = json.Marshal(raw); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stateFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	e.open(Config{})
	if rec, ok := e.d.state.get(target); !ok || rec.Publish != nil {
		t.Fatalf("old record not read back as one: %+v %v", rec, ok)
	}
	if _, err := e.d.NodePublishVolume(ctx, req("v1", func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().MountFlags = nil })); status.Code(err) != codes.AlreadyExists {
		t.Errorf("republish without noexec over an old record: %v, want AlreadyExists", err)
	}
	if _, err := e.d.NodePublishVolume(ctx, req("v1", nil)); err != nil {
		t.Errorf("republish with noexec over an old record: %v", err)
	}
	if _, err := e.d.NodeUnpublishVolume(ctx, unpublishReq("v1", target)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("target left: %v", err)
	}
}
