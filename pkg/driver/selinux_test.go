package driver

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// label is an SELinux label as the kubelet derives it for a pod.
const label = "system_u:object_r:container_file_t:s0:c15,c25"

// kubeletContextFlag is the flag exactly as the kubelet adds it with
// seLinuxMount (its AddSELinuxMountOption quotes with %q).
var kubeletContextFlag = fmt.Sprintf("context=%q", label)

func TestParseContextFlag(t *testing.T) {
	for in, want := range map[string]string{
		kubeletContextFlag:                           label,
		"context=system_u:object_r:container_file_t": "system_u:object_r:container_file_t", // a PV's mountOptions
	} {
		if got, err := parseContextFlag(in); err != nil || got != want {
			t.Errorf("%s: %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{
		`context="` + label,             // unbalanced
		`context="a:b:c\",upperdir=/x"`, // a quote inside the label
		"context=",
		`context=""`,
		"context=container_file_t",
	} {
		if _, err := parseContextFlag(bad); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "mount_flags") {
			t.Errorf("%s: %v, want InvalidArgument naming mount_flags", bad, err)
		}
	}
	vc := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{
		MountFlags: []string{kubeletContextFlag, "context=user_u:object_r:other_t"}}}}
	if _, err := mountFlags(vc); status.Code(err) != codes.InvalidArgument {
		t.Errorf("two different context= flags: %v, want InvalidArgument", err)
	}
	for _, other := range []string{`fscontext="` + label + `"`, `defcontext="` + label + `"`, `rootcontext="` + label + `"`} {
		vc.GetMount().MountFlags = []string{other}
		if _, err := mountFlags(vc); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument (only context= is supported)", other, err)
		}
	}
}

// recordingMounter records the options of each mount and mounts for real
// without the SELinux label (the kernel here has no SELinux).
type recordingMounter struct {
	KernelMounter
	mu   sync.Mutex
	opts []cfs.MountOptions
}

func (m *recordingMounter) Mount(ctx context.Context, image, target string, opts cfs.MountOptions) (cfs.MountResult, error) {
	m.mu.Lock()
	m.opts = append(m.opts, opts)
	m.mu.Unlock()
	opts.SELinuxContext = ""
	return m.KernelMounter.Mount(ctx, image, target, opts)
}

// TestSELinuxContextReachesTheMount: on an SELinux node the kubelet's
// context= flag becomes the SELinuxContext of the mount.
func TestSELinuxContextReachesTheMount(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	files := sampleFiles(3)
	dg := repo.publish(t, "app", files)
	m := &recordingMounter{}
	e := newTestEnv(t, Config{}, WithMounter(m), WithSELinux(func() bool { return true }))
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	req := publishReq("v", target, map[string]string{"repository": repo.srv.URL, "digest": dg.String()})
	req.VolumeCapability.GetMount().MountFlags = []string{kubeletContextFlag, "noexec"}
	if _, err := e.d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if len(m.opts) != 1 || m.opts[0].SELinuxContext != label || !m.opts[0].NoExec {
		t.Fatalf("mount options %+v, want SELinuxContext %q and NoExec", m.opts, label)
	}
	if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
	assertClean(t, e, target)
}

// TestSELinuxContextRefusedWithoutSELinux: a context= flag on a node
// without SELinux fails with FailedPrecondition before anything is fetched
// or mounted.
func TestSELinuxContextRefusedWithoutSELinux(t *testing.T) {
	repo := newTestRepo(t)
	e := newTestEnv(t, Config{}, WithSELinux(func() bool { return false }))
	target := filepath.Join(t.TempDir(), "vol")
	req := publishReq("v", target, map[string]string{"repository": repo.srv.URL, "image": "app"})
	req.VolumeCapability.GetMount().MountFlags = []string{kubeletContextFlag}
	_, err := e.d.NodePublishVolume(context.Background(), req)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "mount_flags") || !strings.Contains(err.Error(), "SELinux") {
		t.Fatalf("%v, want FailedPrecondition naming mount_flags and SELinux", err)
	}
	if n := repo.requests("/"); n != 0 {
		t.Errorf("%d requests to the repository for a refused volume", n)
	}
	assertClean(t, e, target)

	// This machine's own answer, when it has no SELinux (CI's case).
	if cfs.SELinuxEnabled() {
		return
	}
	e2 := newTestEnv(t, Config{})
	if _, err := e2.d.NodePublishVolume(context.Background(), req); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("with the node's own SELinux detection: %v, want FailedPrecondition", err)
	}
}
