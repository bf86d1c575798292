// Package node is the node end-to-end test: it builds csi-composefs,
// runs `csi-composefs serve` on a unix socket with a fresh store and a real
// HTTP repository, and drives it over gRPC as kubelet does.
package node

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/csi-composefs/csi-composefs/internal/testrepo"
	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// repo is an HTTP repository whose object requests can be held.
type repo struct {
	dir string
	srv *httptest.Server

	mu   sync.Mutex
	hold chan struct{} // object requests wait on it while set
	seen chan struct{} // closed at the first held request
}

func newRepo(t *testing.T) *repo {
	r := &repo{dir: t.TempDir()}
	fs := http.FileServer(http.Dir(r.dir))
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		hold, seen := r.hold, r.seen
		if hold != nil && seen != nil && strings.HasPrefix(req.URL.Path, "/objects/") {
			close(seen)
			r.seen = nil
		}
		r.mu.Unlock()
		if hold != nil && strings.HasPrefix(req.URL.Path, "/objects/") {
			select {
			case <-hold:
			case <-req.Context().Done():
				return
			}
		}
		fs.ServeHTTP(w, req)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *repo) holdObjects() (release func(), seen <-chan struct{}) {
	h, s := make(chan struct{}), make(chan struct{})
	r.mu.Lock()
	r.hold, r.seen = h, s
	r.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			r.mu.Lock()
			r.hold, r.seen = nil, nil
			r.mu.Unlock()
			close(h)
		})
	}, s
}

// files of image i: most are shared by every image.
func imageFiles(i int) map[string]string {
	m := map[string]string{}
	for j := 0; j < 40; j++ {
		m[fmt.Sprintf("usr/lib/lib%02d.so", j)] = strings.Repeat(fmt.Sprintf("shared library %d ", j), 100+j*10)
	}
	for j := 0; j < 4; j++ {
		m[fmt.Sprintf("app/file%d", j)] = strings.Repeat(fmt.Sprintf("image %d file %d ", i, j), 50)
	}
	m["small"] = fmt.Sprintf("inline %d\n", i)
	return m
}

func (r *repo) publish(t *testing.T, name string, files map[string]string) cfs.Digest {
	return testrepo.Publish(t, r.dir, name, files)
}

// plugin is one run of `csi-composefs serve`.
type plugin struct {
	cmd    *exec.Cmd
	conn   *grpc.ClientConn
	node   csi.NodeClient
	exited chan struct{}
}

type env struct {
	t       *testing.T
	bin     string
	dir     string
	store   string
	sock    string
	allowed string
	runs    int
	kubelet string   // see kubeletRoot
	flags   []string // more serve flags
	environ []string // more environment variables of the plugin
}

// kubeletRoot stands for the kubelet's root directory: the plugin serves
// its registration socket in plugins_registry/ there. It is a short path of
// its own: a unix socket path holds at most 107 bytes, and test names make
// t.TempDir() long.
func (e *env) kubeletRoot() string {
	if e.kubelet == "" {
		d, err := os.MkdirTemp("", "kubelet-")
		if err != nil {
			e.t.Fatal(err)
		}
		e.t.Cleanup(func() { os.RemoveAll(d) })
		e.kubelet = d
	}
	return e.kubelet
}

// built is the plugin binary, built once for every test of the package.
var built struct {
	once     sync.Once
	dir, bin string
	err      error
}

func buildBinary(t *testing.T) string {
	t.Helper()
	built.once.Do(func() {
		if built.dir, built.err = os.MkdirTemp("", "csi-composefs-e2e-"); built.err != nil {
			return
		}
		built.bin = filepath.Join(built.dir, "csi-composefs")
		cmd := exec.Command("go", "build", "-o", built.bin, "github.com/csi-composefs/csi-composefs/cmd/csi-composefs")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			built.err = fmt.Errorf("building the plugin: %v\n%s", err, out)
		}
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.bin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

func (e *env) start() *plugin {
	e.t.Helper()
	e.runs++
	logf, err := os.Create(filepath.Join(e.dir, fmt.Sprintf("plugin-%d.log", e.runs)))
	if err != nil {
		e.t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(e.bin, append([]string{"serve", "--endpoint", "unix://" + e.sock, "--store-dir", e.store,
		"--node-id", "e2e-node", "--allowed-sources", e.allowed, "--metrics-address", "127.0.0.1:0",
		"--gc-interval", "0", "-v", "2", "--kubelet-root", e.kubeletRoot(), "--kubelet-registration-path", e.sock}, e.flags...)...)
	cmd.Env = append(os.Environ(), e.environ...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	p := &plugin{cmd: cmd, exited: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.exited) }()
	e.t.Cleanup(func() { p.kill() })
	conn, err := grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	p.conn, p.node = conn, csi.NewNodeClient(conn)
	id := csi.NewIdentityClient(conn)
	// Wait until Probe says ready (bounded; not a timing assertion).
	for i := 0; ; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		r, err := id.Probe(ctx, &csi.ProbeRequest{})
		cancel()
		if err == nil && r.GetReady().GetValue() {
			break
		}
		select {
		case <-p.exited:
			e.t.Fatalf("plugin exited at start; see %s", logf.Name())
		default:
		}
		if i > 600 {
			e.t.Fatalf("plugin not ready: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return p
}

// checkRegistration asks the plugin's registration socket what the
// kubelet's plugin watcher asks, and checks the answer names the CSI socket.
func checkRegistration(t *testing.T, regSock, csiSock string) {
	t.Helper()
	fi, err := os.Lstat(regSock)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("registration socket %s: %v %v, want a socket with mode 0600", regSock, fi, err)
	}
	conn, err := grpc.NewClient("unix://"+regSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := registerapi.NewRegistrationClient(conn).GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatalf("GetInfo: %v", err)
	}
	if info.GetType() != registerapi.CSIPlugin || info.GetName() != "composefs.csi.dev" || info.GetEndpoint() != csiSock {
		t.Fatalf("GetInfo: %v, want a CSIPlugin composefs.csi.dev at %s", info, csiSock)
	}
}

func (p *plugin) kill() {
	if p.cmd.Process != nil {
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.exited
	}
}

func publishReq(vol, target string, vc map[string]string) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{
		VolumeId: vol, TargetPath: target, VolumeContext: vc, Readonly: true,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY},
		},
	}
}

func checkFiles(t *testing.T, target string, files map[string]string) {
	t.Helper()
	for p, want := range files {
		got, err := os.ReadFile(filepath.Join(target, p))
		if err != nil {
			t.Fatalf("reading %s through %s: %v", p, target, err)
		}
		if string(got) != want {
			t.Fatalf("%s in %s: wrong content", p, target)
		}
	}
}

func countObjects(t *testing.T, store string) int {
	n := 0
	_ = filepath.Walk(filepath.Join(store, "objects"), func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n++
		}
		return nil
	})
	return n
}

// requirePluginRun skips a test that builds the plugin binary and runs it
// with real mounts: it needs root, and is not for -short.
func requirePluginRun(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the node e2e mounts composefs images: needs root")
	}
	if testing.Short() {
		t.Skip("builds and runs the plugin binary")
	}
}

func TestNode(t *testing.T) {
	requirePluginRun(t)
	r := newRepo(t)
	const nImages, nTargets = 5, 40
	digests := make([]cfs.Digest, nImages)
	for i := range digests {
		digests[i] = r.publish(t, fmt.Sprintf("img-%d", i), imageFiles(i))
	}
	late := r.publish(t, "late", imageFiles(99))
	e := &env{t: t, bin: buildBinary(t), dir: t.TempDir(), allowed: r.srv.URL + "/"}
	e.store = filepath.Join(e.dir, "store")
	e.sock = filepath.Join(e.dir, "csi.sock")
	p := e.start()
	checkRegistration(t, filepath.Join(e.kubeletRoot(), "plugins_registry", "composefs.csi.dev-reg.sock"), e.sock)
	pods := t.TempDir()
	target := func(i int) string { return filepath.Join(pods, fmt.Sprintf("pod-%02d", i), "volumes", "vol") }
	t.Cleanup(func() { // never leave mounts behind
		for i := 0; i <= nTargets; i++ {
			for {
				if _, m, _ := cfs.IsMounted(target(i)); !m || cfs.Unmount(target(i), true) != nil {
					break
				}
			}
		}
	})
	vc := func(i int) map[string]string {
		return map[string]string{"repository": r.srv.URL, "image": fmt.Sprintf("img-%d", i%nImages),
			"digest": digests[i%nImages].String(), "csi.storage.k8s.io/pod.name": fmt.Sprintf("pod-%02d", i),
			"csi.storage.k8s.io/pod.namespace": "e2e"}
	}
	ctx := context.Background()

	// 40 concurrent publishes of 5 images that share most files.
	var wg sync.WaitGroup
	errs := make([]error, nTargets)
	for i := 0; i < nTargets; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			defer cancel()
			for {
				_, err := p.node.NodePublishVolume(cctx, publishReq(fmt.Sprintf("vol-%d", i), target(i), vc(i)))
				if status.Code(err) == codes.Aborted && cctx.Err() == nil {
					continue // kubelet retries non-final codes
				}
				errs[i] = err
				return
			}
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	for i := 0; i < nTargets; i++ {
		checkFiles(t, target(i), imageFiles(i%nImages))
	}
	objects := countObjects(t, e.store)
	if want := 40 + 4*nImages; objects != want {
		t.Errorf("store has %d objects, want %d (shared files stored once)", objects, want)
	}

	// kill -9 during a fetch.
	release, seen := r.holdObjects()
	defer release()
	lateVC := map[string]string{"repository": r.srv.URL, "image": "late", "digest": late.String()}
	lateTarget := target(nTargets)
	done := make(chan error, 1)
	go func() {
		_, err := p.node.NodePublishVolume(ctx, publishReq("vol-late", lateTarget, lateVC))
		done <- err
	}()
	<-seen
	p.kill()
	if err := <-done; status.Code(err) != codes.Unavailable {
		t.Errorf("publish interrupted by kill -9: %v, want Unavailable", err)
	}
	// Existing mounts keep serving with no plugin running.
	checkFiles(t, target(0), imageFiles(0))
	release()
	p = e.start()
	// State recovered: stats answer for volumes published before the kill.
	st, err := p.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "vol-3", VolumePath: target(3)})
	if err != nil || st.GetVolumeCondition().GetAbnormal() {
		t.Fatalf("stats after restart: %v %v", st, err)
	}
	// The interrupted publish completes on retry.
	if _, err := p.node.NodePublishVolume(ctx, publishReq("vol-late", lateTarget, lateVC)); err != nil {
		t.Fatalf("retried publish: %v", err)
	}
	checkFiles(t, lateTarget, imageFiles(99))

	// An image no volume uses any more: published once, then unpublished.
	unused := r.publish(t, "unused", imageFiles(77))
	unusedTarget := filepath.Join(pods, "unused", "vol")
	if _, err := p.node.NodePublishVolume(ctx, publishReq("vol-unused", unusedTarget,
		map[string]string{"repository": r.srv.URL, "image": "unused", "digest": unused.String()})); err != nil {
		t.Fatalf("publishing the image GC is to remove: %v", err)
	}
	if _, err := p.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-unused", TargetPath: unusedTarget}); err != nil {
		t.Fatal(err)
	}

	// A GC pass over budget (1 byte) and without grace removes every image
	// no volume pins, here the unused one and its 4 files of its own, and
	// nothing that a mounted volume uses (the plugin runs GC once the
	// state is recovered; here a restart with a short interval triggers it).
	before := countObjects(t, e.store)
	gcPass(t, e, &p)
	if _, err := os.Stat(filepath.Join(e.store, "images", unused.String()+".cfs")); !os.IsNotExist(err) {
		t.Errorf("GC over budget kept the unpinned image: %v", err)
	}
	if after := countObjects(t, e.store); after != before-4 {
		t.Errorf("GC removed %d objects, want the 4 of the unpinned image only", before-after)
	}
	for _, dg := range append(digests, late) {
		if _, err := os.Stat(filepath.Join(e.store, "images", dg.String()+".cfs")); err != nil {
			t.Errorf("GC removed the image %s of mounted volumes: %v", dg, err)
		}
	}
	for i := 0; i < nTargets; i++ {
		checkFiles(t, target(i), imageFiles(i%nImages))
	}
	checkFiles(t, lateTarget, imageFiles(99))

	// Final errors, each with its code, leaving nothing behind.
	broken := r.publish(t, "broken", map[string]string{"only": strings.Repeat("unique ", 300)})
	if err := os.RemoveAll(filepath.Join(r.dir, "objects")); err != nil { // every object gone
		t.Fatal(err)
	}
	bad := filepath.Join(pods, "bad", "vol")
	for _, tt := range []struct {
		name string
		vc   map[string]string
		code codes.Code
	}{
		{"bad attributes", map[string]string{"repository": r.srv.URL, "image": "img-0", "pulPolicy": "Never"}, codes.InvalidArgument},
		{"wrong digest", map[string]string{"repository": r.srv.URL, "image": "img-0", "digest": (cfs.Digest{1, 2, 3}).String()}, codes.FailedPrecondition},
		{"missing object", map[string]string{"repository": r.srv.URL, "image": "broken", "digest": broken.String()}, codes.NotFound},
		{"source outside the allow-list", map[string]string{"repository": "http://127.0.0.1:9/other", "image": "x"}, codes.PermissionDenied},
	} {
		_, err := p.node.NodePublishVolume(ctx, publishReq("vol-bad", bad, tt.vc))
		if status.Code(err) != tt.code {
			t.Errorf("%s: %v, want %v", tt.name, err, tt.code)
		}
		if _, err := os.Lstat(bad); err == nil {
			t.Errorf("%s: target left behind", tt.name)
		}
	}

	// Unpublish everything.
	for i := 0; i <= nTargets; i++ {
		vol := fmt.Sprintf("vol-%d", i)
		if i == nTargets {
			vol = "vol-late"
		}
		if _, err := p.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target(i)}); err != nil {
			t.Fatalf("unpublish %d: %v", i, err)
		}
		if _, err := os.Lstat(target(i)); err == nil {
			t.Errorf("target %d not removed", i)
		}
	}
	if ms, _ := cfs.ComposefsMounts(); len(ms) != 0 {
		for _, m := range ms {
			if strings.HasPrefix(m.MountPoint, pods) {
				t.Errorf("mount left: %s", m.MountPoint)
			}
		}
	}
}

// gcPass restarts the plugin with a short GC interval, a store budget of
// one byte and no grace (so GC removes every image no volume pins), and
// waits for the log line of a finished GC.
func gcPass(t *testing.T, e *env, pp **plugin) {
	t.Helper()
	(*pp).kill()
	e.runs++
	logName := filepath.Join(e.dir, fmt.Sprintf("plugin-%d.log", e.runs))
	logf, err := os.Create(logName)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(e.bin, "serve", "--endpoint", "unix://"+e.sock, "--store-dir", e.store,
		"--node-id", "e2e-node", "--allowed-sources", e.allowed, "--metrics-address", "127.0.0.1:0",
		"--gc-interval", "100ms", "--store-max-size", "1", "--gc-grace", "0", "-v", "2", "--kubelet-root", e.kubeletRoot(), "--kubelet-registration-path", e.sock)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &plugin{cmd: cmd, exited: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.exited) }()
	t.Cleanup(p.kill)
	// Wait for the log line of a finished GC (bounded).
	for i := 0; ; i++ {
		data, _ := os.ReadFile(logName)
		if strings.Contains(string(data), "Store GC done") {
			break
		}
		if i > 1200 {
			t.Fatalf("no GC pass in the plugin log %s", logName)
		}
		time.Sleep(50 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	p.conn, p.node = conn, csi.NewNodeClient(conn)
	*pp = p
}
