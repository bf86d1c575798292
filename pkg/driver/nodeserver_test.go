package driver

import (
	"context"
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// assertClean checks that nothing of a failed publish is left behind.
func assertClean(t *testing.T, e *testEnv, target string) {
	t.Helper()
	if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("target %s left behind (err %v)", target, err)
	}
	if _, mounted, _ := cfs.IsMounted(target); mounted {
		t.Errorf("mount left at %s", target)
	}
	if p := e.store.Pinned(); len(p) != 0 {
		t.Errorf("pins left: %v", p)
	}
	if _, ok := e.d.state.get(target); ok {
		t.Errorf("state left for %s", target)
	}
}

func TestPublishUnpublish(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	d1 := repo.publish(t, "app-1", sampleFiles(1))
	d2 := repo.publish(t, "app-2", sampleFiles(2))
	e := newTestEnv(t, Config{})
	ctx := context.Background()
	pods := t.TempDir()
	target := filepath.Join(pods, "pod1", "vol")
	cleanupMounts(t, target)
	vc := map[string]string{"repository": repo.srv.URL, "image": "app-1", "digest": d1.String()}

	if _, err := e.d.NodePublishVolume(ctx, publishReq("vol-1", target, vc)); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(target, "bin/app"))
	if err != nil || string(got) != sampleFiles(1)["bin/app"] {
		t.Fatalf("reading through the mount: %v", err)
	}
	mi, mounted, err := cfs.IsMounted(target)
	if err != nil || !mounted || !mi.IsComposefs() || !mi.HasOption("ro") || !mi.HasOption("nodev") || !mi.HasOption("nosuid") {
		t.Fatalf("mount at target: %+v %v %v", mi, mounted, err)
	}
	if p := e.store.Pinned(); p[d1] != 1 {
		t.Fatalf("pins %v, want %s once", p, d1)
	}

	// Idempotent: the same volume again is OK and fetches nothing.
	before := repo.requests("/")
	for i := 0; i < 3; i++ {
		if _, err := e.d.NodePublishVolume(ctx, publishReq("vol-1", target, vc)); err != nil {
			t.Fatalf("repeat %d: %v", i, err)
		}
	}
	if n := repo.requests("/"); n != before {
		t.Errorf("repeated publish made %d requests", n-before)
	}
	// Another image at the same target: AlreadyExists.
	vc2 := map[string]string{"repository": repo.srv.URL, "digest": d2.String()}
	if _, err := e.d.NodePublishVolume(ctx, publishReq("vol-2", target, vc2)); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("other image at the same target: %v, want AlreadyExists", err)
	}

	// A second target of the same PV shares the image and its pin.
	target2 := filepath.Join(pods, "pod2", "vol")
	cleanupMounts(t, target2)
	if _, err := e.d.NodePublishVolume(ctx, publishReq("vol-1", target2, vc)); err != nil {
		t.Fatal(err)
	}
	if p := e.store.Pinned(); p[d1] != 2 {
		t.Fatalf("pins %v, want %s twice", p, d1)
	}

	// Stats and condition.
	sresp, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "vol-1", VolumePath: target})
	if err != nil {
		t.Fatal(err)
	}
	if c := sresp.GetVolumeCondition(); c == nil || c.Abnormal {
		t.Fatalf("condition %+v, want normal", c)
	}
	if u := sresp.GetUsage(); len(u) != 2 || u[0].Used <= 0 || u[1].Used <= 0 {
		t.Fatalf("usage %+v", u)
	}
	if _, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "vol-9", VolumePath: target}); status.Code(err) != codes.NotFound {
		t.Fatalf("stats of another volume: %v, want NotFound", err)
	}

	for _, tg := range []string{target, target2} {
		if _, err := e.d.NodeUnpublishVolume(ctx, unpublishReq("vol-1", tg)); err != nil {
			t.Fatal(err)
		}
		// Again: already done is OK.
		if _, err := e.d.NodeUnpublishVolume(ctx, unpublishReq("vol-1", tg)); err != nil {
			t.Fatal(err)
		}
	}
	assertClean(t, e, target)
	assertClean(t, e, target2)
}

func TestPublishErrors(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "app", sampleFiles(1))
	// An image whose object is missing from the repository.
	dm := repo.publish(t, "broken", map[string]string{"only": strings.Repeat("unique object ", 100)})
	objs := objectsOf(t, filepath.Join(repo.dir, "images", "broken"))
	if err := os.Remove(filepath.Join(repo.dir, "objects", objs[0].Digest.ObjectPath())); err != nil {
		t.Fatal(err)
	}
	al, _ := ParseAllowList(repo.srv.URL + "/")
	e := newTestEnv(t, Config{AllowedSources: al})
	wrong := cfs.Digest{1, 2, 3}
	for _, tt := range []struct {
		name string
		vc   map[string]string
		req  func(*csi.NodePublishVolumeRequest)
		code codes.Code
		has  string
	}{
		{"unknown attribute", map[string]string{"repository": repo.srv.URL, "image": "app", "imgae": "x"}, nil, codes.InvalidArgument, "imgae"},
		{"no capability", map[string]string{"repository": repo.srv.URL, "image": "app"}, func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability = nil }, codes.InvalidArgument, "volume_capability"},
		{"block", map[string]string{"repository": repo.srv.URL, "image": "app"}, func(r *csi.NodePublishVolumeRequest) {
			r.VolumeCapability.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
		}, codes.InvalidArgument, "block"},
		{"writer mode", map[string]string{"repository": repo.srv.URL, "image": "app"}, func(r *csi.NodePublishVolumeRequest) {
			r.VolumeCapability.AccessMode.Mode = csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER
		}, codes.InvalidArgument, "access_mode"},
		{"image not found", map[string]string{"repository": repo.srv.URL, "image": "nope"}, nil, codes.NotFound, "nope"},
		{"wrong digest", map[string]string{"repository": repo.srv.URL, "image": "app", "digest": wrong.String()}, nil, codes.FailedPrecondition, "digest"},
		{"missing object", map[string]string{"repository": repo.srv.URL, "image": "broken", "digest": dm.String()}, nil, codes.NotFound, objs[0].Digest.String()},
		{"source not allowed", map[string]string{"repository": "http://127.0.0.1:1/other", "image": "app"}, nil, codes.PermissionDenied, "allowed"},
		{"verity require without fs-verity", map[string]string{"repository": repo.srv.URL, "digest": dg.String(), "verity": "require"}, nil, codes.FailedPrecondition, "fs-verity"},
		{"never pulled", map[string]string{"repository": repo.srv.URL, "digest": dg.String(), "pullPolicy": "Never"}, nil, codes.FailedPrecondition, "Never"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if tt.code == codes.FailedPrecondition && strings.Contains(tt.name, "verity") && e.store.VerityEnabled() {
				t.Skip("this node has fs-verity")
			}
			target := filepath.Join(t.TempDir(), "pod", "vol")
			cleanupMounts(t, target)
			req := publishReq("v", target, tt.vc)
			if tt.req != nil {
				tt.req(req)
			}
			_, err := e.d.NodePublishVolume(context.Background(), req)
			if status.Code(err) != tt.code || !strings.Contains(err.Error(), tt.has) {
				t.Fatalf("got %v, want %v naming %q", err, tt.code, tt.has)
			}
			assertClean(t, e, target)
		})
	}
}

func objectsOf(t *testing.T, image string) []cfs.Object {
	t.Helper()
	f, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	img, err := cfs.Open(f, fi.Size(), cfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return img.Objects()
}

// A fetch that outlives the call's deadline goes on in the background;
// the call answers Aborted and leaves nothing; calls meanwhile join it
// (one download); the retry after it ends succeeds.
func TestLongFetchContinues(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "big", sampleFiles(7))
	e := newTestEnv(t, Config{WaitMargin: time.Millisecond})
	release, seen := repo.holdPrefix("/objects/")
	defer release()
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	vc := map[string]string{"repository": repo.srv.URL, "image": "big", "digest": dg.String()}

	// The first call: cancelled once the fetch is downloading objects.
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-seen; cancel() }()
	_, err := e.d.NodePublishVolume(ctx, publishReq("v", target, vc))
	if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "in progress") {
		t.Fatalf("first call: %v, want Aborted (in progress)", err)
	}
	assertClean(t, e, target)
	if e.d.ops.inFlight() != 1 {
		t.Fatalf("%d fetches in flight, want 1", e.d.ops.inFlight())
	}
	// A second call while it runs joins it: no second image download.
	ctx2, cancel2 := context.WithCancel(context.Background())
	cancel2()
	if _, err := e.d.NodePublishVolume(ctx2, publishReq("v", target, vc)); status.Code(err) != codes.Aborted {
		t.Fatalf("second call: %v, want Aborted", err)
	}
	release()
	// The retry waits for the running fetch and mounts.
	if _, err := e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc)); err != nil {
		t.Fatalf("retry: %v", err)
	}
	if n := repo.requests("/images/"); n != 1 {
		t.Errorf("image requested %d times, want 1", n)
	}
	if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
	assertClean(t, e, target)
}

// A call on a target another call is working on answers Aborted.
func TestSameTargetAborted(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "app", sampleFiles(3))
	e := newTestEnv(t, Config{})
	release, seen := repo.holdPrefix("/images/")
	defer release()
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	vc := map[string]string{"repository": repo.srv.URL, "digest": dg.String()}
	var wg sync.WaitGroup
	var firstErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, firstErr = e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc))
	}()
	<-seen
	_, err := e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc))
	if status.Code(err) != codes.Aborted {
		t.Errorf("concurrent publish: %v, want Aborted", err)
	}
	_, err = e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target))
	if status.Code(err) != codes.Aborted {
		t.Errorf("concurrent unpublish: %v, want Aborted", err)
	}
	release()
	wg.Wait()
	if firstErr != nil {
		t.Fatal(firstErr)
	}
	if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
}

// Mounts outlive the plugin: a new driver on the same store finds them,
// pins their images again, drops records whose mount went away, and
// unpublishes normally.
func TestRestartRecovery(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "app", sampleFiles(4))
	e := newTestEnv(t, Config{})
	dir := t.TempDir()
	kept, gone := filepath.Join(dir, "kept"), filepath.Join(dir, "gone")
	cleanupMounts(t, kept)
	cleanupMounts(t, gone)
	vc := map[string]string{"repository": repo.srv.URL, "image": "app"}
	for _, tg := range []string{kept, gone} {
		if _, err := e.d.NodePublishVolume(context.Background(), publishReq("v", tg, vc)); err != nil {
			t.Fatal(err)
		}
	}
	e.close()
	if err := cfs.Unmount(gone, false); err != nil { // e.g. a node reboot
		t.Fatal(err)
	}
	// Restart with a store that GC empties of everything not pinned, so
	// only restored pins can keep the volume's content.
	e.storeOpts = fetch.Options{MaxSize: 1, GCGrace: time.Nanosecond}
	e.open(Config{})
	if p := e.store.Pinned(); p[dg] != 1 {
		t.Fatalf("pins after restart %v, want %s once", p, dg)
	}
	if _, ok := e.d.state.get(gone); ok {
		t.Error("the record of an unmounted volume survived recovery")
	}
	// GC with the volume pinned removes nothing it needs.
	if _, err := e.d.RunGC(context.Background()); err != nil {
		t.Fatal(err)
	}
	for name := range sampleFiles(0) {
		if _, err := os.ReadFile(filepath.Join(kept, name)); err != nil {
			t.Fatalf("after GC: %v", err)
		}
	}
	// A repeat publish after the restart is recognised (name-only volume).
	if _, err := e.d.NodePublishVolume(context.Background(), publishReq("v", kept, vc)); err != nil {
		t.Fatal(err)
	}
	for _, tg := range []string{kept, gone} {
		if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", tg)); err != nil {
			t.Fatal(err)
		}
		assertClean(t, e, tg)
	}
}

// An object missing from the store makes the volume abnormal.
func TestVolumeConditionAbnormal(t *testing.T) {
	needRoot(t)
	e, _, target, dg := publishSample(t, 5)
	objs := objectsOf(t, e.store.ImagePath(dg))
	if err := os.Remove(filepath.Join(e.store.ObjectsDir(), objs[0].Digest.ObjectPath())); err != nil {
		t.Fatal(err)
	}
	c := e.volumeCondition(t, target)
	if !c.GetAbnormal() || !strings.Contains(c.GetMessage(), objs[0].Digest.String()) {
		t.Fatalf("condition %+v, want abnormal naming the object", c)
	}
	if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
}

type recordedEvent struct {
	pod     PodInfo
	warning bool
	reason  string
	message string
}

type fakeRecorder struct {
	mu     sync.Mutex
	events []recordedEvent
}

func (f *fakeRecorder) PodEvent(_ context.Context, pod PodInfo, warning bool, reason, message string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.events = append(f.events, recordedEvent{pod, warning, reason, message})
}

// Final fetch failures become warning events on the pod.
func TestPodEvents(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	repo.publish(t, "app", sampleFiles(8))
	rec := &fakeRecorder{}
	e := newTestEnv(t, Config{}, WithEventRecorder(rec))
	pod := map[string]string{"csi.storage.k8s.io/pod.name": "web-0", "csi.storage.k8s.io/pod.namespace": "shop"}
	for _, tt := range []struct {
		extra  map[string]string
		reason string
	}{
		{map[string]string{"image": "missing"}, ReasonFetchFailed},
		{map[string]string{"image": "app", "digest": (cfs.Digest{9}).String()}, ReasonVerificationFailed},
	} {
		vc := map[string]string{"repository": repo.srv.URL}
		for k, v := range pod {
			vc[k] = v
		}
		for k, v := range tt.extra {
			vc[k] = v
		}
		target := filepath.Join(t.TempDir(), "vol")
		if _, err := e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc)); err == nil {
			t.Fatal("publish succeeded")
		}
		rec.mu.Lock()
		last := rec.events[len(rec.events)-1]
		rec.mu.Unlock()
		if last.pod.Name != "web-0" || last.pod.Namespace != "shop" || !last.warning || last.reason != tt.reason {
			t.Errorf("event %+v, want a %s warning on shop/web-0", last, tt.reason)
		}
	}
}

// A crash between the mount and its record leaves a composefs mount
// without state: the retried publish adopts it instead of failing.
func TestPublishAdoptsUnrecordedMount(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "app", sampleFiles(10))
	e := newTestEnv(t, Config{})
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	vc := map[string]string{"repository": repo.srv.URL, "digest": dg.String()}
	if _, err := e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc)); err != nil {
		t.Fatal(err)
	}
	// Forget the record, as if the plugin died before writing it.
	if err := e.d.state.remove(target); err != nil {
		t.Fatal(err)
	}
	e.close()
	e.open(Config{})
	if p := e.store.Pinned(); p[dg] != 1 {
		t.Fatalf("after the restart, pins %v: the unrecorded mount's image must stay pinned", p)
	}
	if _, err := e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc)); err != nil {
		t.Fatalf("retry over an unrecorded mount: %v", err)
	}
	if p := e.store.Pinned(); p[dg] != 1 {
		t.Fatalf("pins %v, want the adopted image once", p)
	}
	if _, ok := e.d.state.get(target); !ok {
		t.Fatal("adopted mount not recorded")
	}
	// Another image over it is refused.
	d2 := repo.publish(t, "other", sampleFiles(11))
	if _, err := e.d.NodePublishVolume(context.Background(), publishReq("v2", target, map[string]string{"repository": repo.srv.URL, "digest": d2.String()})); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("other image over the volume: %v, want AlreadyExists", err)
	}
	if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
	// Whether the driver made the directory died with the record: it stays
	// (kubelet removes its mount directory after a successful unpublish).
	if err := os.Remove(target); err != nil {
		t.Errorf("the target is not left as an empty directory: %v", err)
	}
	assertClean(t, e, target)
}

// TestVerifyQuarantinesCorruptObject corrupts an object of a published
// volume in place (same size, other bytes): the periodic verification moves
// it to quarantine and the volume then reports an abnormal condition.
func TestVerifyQuarantinesCorruptObject(t *testing.T) {
	needRoot(t)
	e, _, target, dg := publishSample(t, 5)
	objs := objectsOf(t, e.store.ImagePath(dg))
	p := filepath.Join(e.store.ObjectsDir(), objs[0].Digest.ObjectPath())
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	rep, err := e.d.RunVerify(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Corrupt) != 1 || !strings.Contains(rep.Corrupt[0].Path, objs[0].Digest.String()[2:]) {
		t.Fatalf("verification found %+v, want the corrupted object", rep.Corrupt)
	}
	if c := e.volumeCondition(t, target); !c.GetAbnormal() || !strings.Contains(c.GetMessage(), objs[0].Digest.String()) {
		t.Fatalf("condition %+v, want abnormal naming the object", c)
	}
	if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
}

// TestGCThenRepublishRefetches: the store's GC removes an unpublished image
// and its objects (here called directly, as when a publish lands in the
// middle of a sweep, before the driver has forgotten its marks); publishing
// it again must fetch them again, not trust the "all objects present" mark.
func TestGCThenRepublishRefetches(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "app", sampleFiles(3))
	e := &testEnv{t: t, root: t.TempDir(), storeOpts: fetch.Options{MaxSize: 1, GCGrace: time.Nanosecond}}
	e.open(Config{})
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	vc := map[string]string{"repository": repo.srv.URL, "image": "app", "digest": dg.String()}
	for round := 0; round < 2; round++ {
		if _, err := e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc)); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		for name, content := range sampleFiles(3) {
			got, err := os.ReadFile(filepath.Join(target, name))
			if err != nil || string(got) != content {
				t.Fatalf("round %d: %s: %v", round, name, err)
			}
		}
		if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
			t.Fatal(err)
		}
		st, err := e.store.GC(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if st.ObjectsRemoved == 0 {
			t.Fatalf("round %d: GC removed no object (%+v); the test needs it to", round, st)
		}
	}
}

// TestCredentialsAreCheckedForStoredContent: content fetched with one
// volume's token is not served to a volume without it, and pullPolicy
// Never does not bypass the check.
func TestCredentialsAreCheckedForStoredContent(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "private", sampleFiles(4))
	repo.token = "s3cret"
	e := newTestEnv(t, Config{})
	vc := map[string]string{"repository": repo.srv.URL, "image": "private", "digest": dg.String()}
	good := filepath.Join(t.TempDir(), "good")
	cleanupMounts(t, good)
	req := publishReq("v1", good, vc)
	req.Secrets = map[string]string{"token": "s3cret"}
	if _, err := e.d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatalf("with the token: %v", err)
	}
	for _, tt := range []struct {
		name    string
		secrets map[string]string
		policy  string
		code    codes.Code
	}{
		{"no token", nil, "", codes.PermissionDenied},
		{"wrong token", map[string]string{"token": "guess"}, "", codes.PermissionDenied},
		{"no token, Never", nil, "Never", codes.FailedPrecondition},
	} {
		target := filepath.Join(t.TempDir(), "other")
		cleanupMounts(t, target)
		vc2 := maps.Clone(vc)
		if tt.policy != "" {
			vc2["pullPolicy"] = tt.policy
		}
		r := publishReq("v2", target, vc2)
		r.Secrets = tt.secrets
		_, err := e.d.NodePublishVolume(context.Background(), r)
		if status.Code(err) != tt.code {
			t.Errorf("%s: %v, want %v", tt.name, err, tt.code)
		}
		if _, mounted, _ := cfs.IsMounted(target); mounted {
			t.Errorf("%s: mounted anyway", tt.name)
		}
		if p := e.store.Pinned(); p[dg] != 1 {
			t.Errorf("%s: pins %v, want only the first volume's", tt.name, p)
		}
	}
	// The same token again is served from the store without a download.
	before := repo.requests("/objects/")
	again := filepath.Join(t.TempDir(), "again")
	cleanupMounts(t, again)
	req2 := publishReq("v3", again, vc)
	req2.Secrets = map[string]string{"token": "s3cret"}
	if _, err := e.d.NodePublishVolume(context.Background(), req2); err != nil {
		t.Fatal(err)
	}
	if n := repo.requests("/objects/") - before; n != 0 {
		t.Errorf("%d object requests for content already on the node", n)
	}
	for tg, volID := range map[string]string{good: "v1", again: "v3"} {
		if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq(volID, tg)); err != nil {
			t.Fatal(err)
		}
	}
}

// TestMountFlags: noexec from a PV's mountOptions reaches the mount; flags
// a read-only composefs volume cannot honour are refused, naming the field.
func TestMountFlags(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "app", sampleFiles(6))
	e := newTestEnv(t, Config{})
	vc := map[string]string{"repository": repo.srv.URL, "digest": dg.String()}
	withFlags := func(target string, flags ...string) *csi.NodePublishVolumeRequest {
		r := publishReq("v", target, vc)
		r.VolumeCapability.GetMount().MountFlags = flags
		return r
	}
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	if _, err := e.d.NodePublishVolume(context.Background(), withFlags(target, "ro", "noexec")); err != nil {
		t.Fatal(err)
	}
	mi, mounted, err := cfs.IsMounted(target)
	if err != nil || !mounted || !mi.HasOption("noexec") || !mi.HasOption("nodev") || !mi.HasOption("nosuid") {
		t.Fatalf("mount %+v (mounted %v, err %v), want noexec,nodev,nosuid", mi, mounted, err)
	}
	if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
	for _, flags := range [][]string{{"rw"}, {"nosuid", "exec"}, {"uid=1000"}} {
		other := filepath.Join(t.TempDir(), "vol")
		_, err := e.d.NodePublishVolume(context.Background(), withFlags(other, flags...))
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "mount_flags") {
			t.Errorf("flags %q: %v, want InvalidArgument naming mount_flags", flags, err)
		}
		assertClean(t, e, other)
	}
}

// TestVerifyIntervalSchedule: with VerifyInterval set, the driver re-hashes
// the store by itself, again and again: an object corrupted after publish
// is quarantined without anyone calling RunVerify, and so is another one
// corrupted after that first pass; the volume then reports abnormal.
func TestVerifyIntervalSchedule(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	dg := repo.publish(t, "app", sampleFiles(6))
	e := newTestEnv(t, Config{VerifyInterval: 20 * time.Millisecond})
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	vc := map[string]string{"repository": repo.srv.URL, "digest": dg.String()}
	if _, err := e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc)); err != nil {
		t.Fatal(err)
	}
	objs := objectsOf(t, e.store.ImagePath(dg))
	if len(objs) < 2 {
		t.Fatalf("the sample image has %d objects, want at least 2", len(objs))
	}
	quarantined := func() int {
		ents, err := os.ReadDir(filepath.Join(e.store.Root(), "quarantine"))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	if n := quarantined(); n != 0 {
		t.Fatalf("%d files quarantined before any corruption", n)
	}
	for i, o := range objs[:2] {
		p := filepath.Join(e.store.ObjectsDir(), o.Digest.ObjectPath())
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		b[0] ^= 0xff
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		// Bounded wait for the background pass (not a timing assertion).
		deadline := time.Now().Add(30 * time.Second)
		for quarantined() < i+1 {
			if time.Now().After(deadline) {
				t.Fatalf("object %d corrupted, not quarantined within 30s: the periodic verification does not run", i)
			}
			time.Sleep(10 * time.Millisecond)
		}
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("corrupt object %s still in objects/: %v", o.Digest, err)
		}
	}
	if c := e.volumeCondition(t, target); !c.GetAbnormal() {
		t.Fatalf("condition %+v, want abnormal", c)
	}
	if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
}
