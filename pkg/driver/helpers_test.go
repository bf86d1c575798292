package driver

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/internal/testrepo"
	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// needRoot skips tests that mount.
func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounts composefs images: needs root (run the tests as root to cover publish and unpublish)")
	}
}

// testRepo is an HTTP repository served by httptest, with hooks to count
// and hold requests.
type testRepo struct {
	dir string
	srv *httptest.Server

	mu    sync.Mutex
	count map[string]int           // requests by path
	hold  map[string]chan struct{} // requests of paths with a prefix wait on the channel
	fail  map[string]int           // path prefix → status to answer
	seen  map[string]chan struct{} // closed at the first request of a path prefix
	token string                   // when set, requests need "Authorization: Bearer <token>"
}

func newTestRepo(t testing.TB) *testRepo {
	t.Helper()
	r := &testRepo{dir: t.TempDir(), count: map[string]int{}, hold: map[string]chan struct{}{},
		fail: map[string]int{}, seen: map[string]chan struct{}{}}
	fsrv := http.FileServer(http.Dir(r.dir))
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		r.count[req.URL.Path]++
		var wait chan struct{}
		code := 0
		for p, ch := range r.hold {
			if strings.HasPrefix(req.URL.Path, p) {
				wait = ch
			}
		}
		for p, c := range r.fail {
			if strings.HasPrefix(req.URL.Path, p) {
				code = c
			}
		}
		if r.token != "" && req.Header.Get("Authorization") != "Bearer "+r.token {
			code = http.StatusUnauthorized
		}
		for p, ch := range r.seen {
			if strings.HasPrefix(req.URL.Path, p) {
				close(ch)
				delete(r.seen, p)
			}
		}
		r.mu.Unlock()
		if wait != nil {
			select {
			case <-wait:
			case <-req.Context().Done():
				return
			}
		}
		if code != 0 {
			http.Error(w, http.StatusText(code), code)
			return
		}
		fsrv.ServeHTTP(w, req)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

// holdPrefix makes requests of paths starting with p wait until the
// returned func is called; seen is closed at the first such request.
func (r *testRepo) holdPrefix(p string) (release func(), seen <-chan struct{}) {
	ch, s := make(chan struct{}), make(chan struct{})
	r.mu.Lock()
	r.hold[p] = ch
	r.seen[p] = s
	r.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			r.mu.Lock()
			delete(r.hold, p)
			r.mu.Unlock()
			close(ch)
		})
	}, s
}

func (r *testRepo) requests(prefix string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for p, c := range r.count {
		if strings.HasPrefix(p, prefix) {
			n += c
		}
	}
	return n
}

// publish builds an image of files (name → content) into the repository.
func (r *testRepo) publish(t testing.TB, name string, files map[string]string) cfs.Digest {
	return testrepo.Publish(t, r.dir, name, files)
}

// sampleFiles returns files sharing most content, with i making a few
// differ; files are large enough to be external objects.
func sampleFiles(i int) map[string]string {
	m := map[string]string{}
	for j := 0; j < 8; j++ {
		m[fmt.Sprintf("lib/shared%d.so", j)] = strings.Repeat(fmt.Sprintf("shared %d ", j), 200)
	}
	m["etc/version"] = strings.Repeat(fmt.Sprintf("version %d\n", i), 20)
	m["bin/app"] = strings.Repeat(fmt.Sprintf("app build %d ", i), 300)
	return m
}

// testEnv is a driver over a fresh store.
type testEnv struct {
	t         testing.TB
	storeOpts fetch.Options // options of the store, besides those the driver's Config sets
	root      string        // store dir
	store     *fetch.Store
	d         *Driver
	metrics   *Metrics
}

func newTestEnv(t testing.TB, cfg Config, opts ...Option) *testEnv {
	t.Helper()
	e := &testEnv{t: t, root: t.TempDir()}
	e.open(cfg, opts...)
	return e
}

func (e *testEnv) open(cfg Config, opts ...Option) {
	e.t.Helper()
	ctx := klog.NewContext(context.Background(), klog.Background())
	so := e.storeOpts
	so.ExtraObjectDirs = cfg.ExtraObjectDirs
	if so.Retries == 0 {
		so.Retries = -1 // tests that count requests set storeOpts.Retries
	}
	st, err := fetch.Open(ctx, e.root, so)
	if err != nil {
		e.t.Fatal(err)
	}
	if cfg.NodeID == "" {
		cfg.NodeID = "test-node"
	}
	e.metrics = NewMetrics(nil)
	d, err := New(cfg, st, append([]Option{WithMetrics(e.metrics)}, opts...)...)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := d.Recover(ctx); err != nil {
		e.t.Fatal(err)
	}
	e.store, e.d = st, d
	e.t.Cleanup(e.close)
}

// close stops the driver and closes the store (mounts stay).
func (e *testEnv) close() {
	if e.d != nil {
		e.d.Close()
		e.store.Close()
		e.d, e.store = nil, nil
	}
}

// cleanupMounts unmounts whatever remains at target when the test ends.
func cleanupMounts(t testing.TB, target string) {
	t.Cleanup(func() {
		for i := 0; i < 8; i++ {
			if _, mounted, _ := cfs.IsMounted(target); !mounted {
				return
			}
			if err := cfs.Unmount(target, true); err != nil {
				t.Errorf("cleanup: %v", err)
				return
			}
		}
	})
}

func publishReq(volID, target string, vc map[string]string) *csi.NodePublishVolumeRequest {
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

func unpublishReq(volID, target string) *csi.NodeUnpublishVolumeRequest {
	return &csi.NodeUnpublishVolumeRequest{VolumeId: volID, TargetPath: target}
}

// publishSample publishes the sample image n from a fresh repository as
// volume "v" at a fresh target of a fresh environment.
func publishSample(t *testing.T, n int) (e *testEnv, repo *testRepo, target string, dg cfs.Digest) {
	t.Helper()
	repo = newTestRepo(t)
	dg = repo.publish(t, "app", sampleFiles(n))
	e = newTestEnv(t, Config{})
	target = filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	vc := map[string]string{"repository": repo.srv.URL, "digest": dg.String()}
	if _, err := e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc)); err != nil {
		t.Fatal(err)
	}
	return e, repo, target, dg
}

// volumeCondition is the condition NodeGetVolumeStats reports for volume "v".
func (e *testEnv) volumeCondition(t *testing.T, target string) *csi.VolumeCondition {
	t.Helper()
	resp, err := e.d.NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: "v", VolumePath: target})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetVolumeCondition()
}
