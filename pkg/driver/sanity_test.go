package driver

import (
	"context"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/ginkgo/v2/types"
	"github.com/onsi/gomega"
	"google.golang.org/grpc"
)

// sanityIdentity advertises a controller service, so that csi-sanity's
// node specs that need CreateVolume ("should work", "should be
// idempotent", "should remove target path") run against the real node
// server with real mounts. Test only: the plugin has no controller.
type sanityIdentity struct{ *Driver }

func (s sanityIdentity) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{{
		Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_CONTROLLER_SERVICE}},
	}}}, nil
}

// sanityController answers CreateVolume with a volume context naming an
// image of the loopback test repository.
type sanityController struct {
	csi.UnimplementedControllerServer
	vc      map[string]string
	created atomic.Int64
}

func (c *sanityController) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{{
		Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME}},
	}}}, nil
}

func (c *sanityController) CreateVolume(_ context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	c.created.Add(1)
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: "sanity-" + req.GetName(), VolumeContext: c.vc}}, nil
}

func (c *sanityController) DeleteVolume(context.Context, *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	return &csi.DeleteVolumeResponse{}, nil
}

// TestSanity runs csi-sanity's Identity and Node specs (the Controller
// specs are skipped: the plugin has no controller).
func TestSanity(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "sanity", sampleFiles(9))
	e := newTestEnv(t, Config{})
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	l, err := Listen("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	ctrl := &sanityController{vc: map[string]string{"repository": repo.srv.URL, "image": "sanity", "digest": dg.String()}}
	gs := grpc.NewServer(grpc.UnaryInterceptor(LogInterceptor()))
	csi.RegisterIdentityServer(gs, sanityIdentity{e.d})
	csi.RegisterNodeServer(gs, e.d)
	csi.RegisterControllerServer(gs, ctrl)
	go func() { _ = gs.Serve(l) }()
	t.Cleanup(gs.Stop)

	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + sock
	cfg.TargetPath = filepath.Join(dir, "mnt")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.IdempotentCount = 10
	cleanupMounts(t, filepath.Join(cfg.TargetPath, "target"))

	sanity.GinkgoTest(&cfg)
	gomega.RegisterFailHandler(ginkgo.Fail)
	suite, reporter := ginkgo.GinkgoConfiguration()
	suite.SkipStrings = append(suite.SkipStrings, `\[Controller Server\]`)
	reporter.Succinct = true
	var report ginkgo.Report
	ginkgo.ReportAfterSuite("count", func(r ginkgo.Report) { report = r })
	suitePassed := ginkgo.RunSpecs(t, "csi-sanity", suite, reporter)
	var passed, failed int
	var names []string
	for _, s := range report.SpecReports {
		if s.LeafNodeType != types.NodeTypeIt {
			continue
		}
		switch {
		case s.State.Is(types.SpecStatePassed):
			passed++
			names = append(names, s.FullText())
		case s.State.Is(types.SpecStateFailureStates):
			failed++
			t.Errorf("csi-sanity %s: %s", s.State, s.FullText())
		case !strings.Contains(s.FullText(), "[Controller Server]"):
			t.Logf("csi-sanity %s: %s", s.State, s.FullText())
		}
	}
	t.Logf("csi-sanity: %d specs passed, %d failed (%d volumes created by the controller shim)", passed, failed, ctrl.created.Load())
	if !suitePassed || failed != 0 {
		t.Fatalf("csi-sanity failed (%d failed specs)", failed)
	}
	// The Node and Identity specs of csi-test that apply to a node plugin
	// without staging or expansion: 14 Node specs (capabilities, info, the
	// argument checks of publish, unpublish and stats, "should remove
	// target path", "should work", "should be idempotent") and 3 Identity
	// specs. A csi-test upgrade that adds or drops specs changes it.
	const wantPassed = 17
	if passed != wantPassed {
		t.Errorf("%d csi-sanity specs passed, want %d: %q", passed, wantPassed, names)
	}
	for _, want := range []string{"should work", "should be idempotent", "should remove target path"} {
		found := false
		for _, n := range names {
			if strings.Contains(n, want) {
				found = true
			}
		}
		if !found {
			t.Errorf("spec %q did not run and pass", want)
		}
	}
	if p := e.store.Pinned(); len(p) != 0 {
		t.Errorf("pins left after the suite: %v", p)
	}
}
