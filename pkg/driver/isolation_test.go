package driver

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// fetchOptionsNoGrace make GC remove every unpinned image and object.
func fetchOptionsNoGrace() fetch.Options { return fetch.Options{MaxSize: 1, GCGrace: time.Nanosecond} }

func setUserXattr(p string) error { return unix.Setxattr(p, "user.test", []byte("x"), 0) }

// grpcNode serves the environment's driver on a unix socket and returns a
// client of its Node service, as kubelet talks to it.
func (e *testEnv) grpcNode(t *testing.T) csi.NodeClient {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "csi.sock")
	l, err := Listen("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	gs := e.d.NewGRPCServer()
	go func() { _ = gs.Serve(l) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return csi.NewNodeClient(conn)
}

// privateFiles are a victim's secrets, large enough to be external objects
// (one of them larger than a proof block).
func privateFiles() map[string]string {
	return map[string]string{
		"etc/secret.key": strings.Repeat("BEGIN PRIVATE KEY victim-only ", 60),
		"etc/db.conf":    strings.Repeat("password=hunter2;", 200),
		"data/big.bin":   strings.Repeat("victim data block ", 3000),
	}
}

// publishVictim publishes the victim's private image (with a token) and
// returns the repository, the image digest and where it is mounted.
func publishVictim(t *testing.T, e *testEnv, node csi.NodeClient) (*testRepo, cfs.Digest, string) {
	t.Helper()
	victim := newTestRepo(t)
	dg := victim.publish(t, "private.cfs", privateFiles())
	victim.token = "victim-token"
	target := filepath.Join(t.TempDir(), "victim")
	cleanupMounts(t, target)
	req := publishReq("victim", target, map[string]string{"repository": victim.srv.URL, "image": "private.cfs", "digest": dg.String()})
	req.Secrets = map[string]string{"token": "victim-token"}
	if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatalf("victim's publish: %v", err)
	}
	t.Cleanup(func() { _, _ = node.NodeUnpublishVolume(context.Background(), unpublishReq("victim", target)) })
	return victim, dg, target
}

// hostileServer answers every request with handler and counts them.
type hostileServer struct {
	*httptest.Server
	mu    sync.Mutex
	paths []string
}

func newHostileServer(t *testing.T, handler http.HandlerFunc) *hostileServer {
	h := &hostileServer{}
	h.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.mu.Lock()
		h.paths = append(h.paths, r.URL.Path)
		h.mu.Unlock()
		handler(w, r)
	}))
	t.Cleanup(h.Close)
	return h
}

func (h *hostileServer) requests(prefix string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, p := range h.paths {
		if strings.HasPrefix(p, prefix) {
			n++
		}
	}
	return n
}

// craftImage writes into dir/images/name an image whose files point at
// objs (digests and sizes someone learnt), without any of their content.
func craftImage(t *testing.T, dir, name string, objs []cfs.Object) {
	t.Helper()
	var dump strings.Builder
	dump.WriteString("/ 0 40755 2 0 0 0 0.0 - - -\n")
	for i, o := range objs {
		fmt.Fprintf(&dump, "/stolen%d %d 100644 1 0 0 0 0.0 %s - %s\n", i, o.Size, o.Digest.ObjectPath(), o.Digest)
	}
	root, err := cfs.ParseDump(strings.NewReader(dump.String()), cfs.DumpOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := cfs.WriteImageFile(filepath.Join(dir, "images", name), root, cfs.DefaultWriteOptions()); err != nil {
		t.Fatal(err)
	}
}

// TestNamingADigestIsNotAccess: a pod without credentials names another
// pod's private image digest against a server that answers 200 with an
// empty body to anything: refused (PermissionDenied), nothing mounted.
func TestNamingADigestIsNotAccess(t *testing.T) {
	needRoot(t)
	e := newTestEnv(t, Config{})
	node := e.grpcNode(t)
	_, dg, _ := publishVictim(t, e, node)
	for _, tt := range []struct {
		name    string
		handler http.HandlerFunc
	}{
		{"empty 200", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) }},
		{"garbage 200", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte(strings.Repeat("x", 4096))) }},
	} {
		attacker := newHostileServer(t, tt.handler)
		target := filepath.Join(t.TempDir(), "attacker")
		cleanupMounts(t, target)
		_, err := node.NodePublishVolume(context.Background(), publishReq("attacker", target,
			map[string]string{"repository": attacker.URL, "image": "x.cfs", "digest": dg.String()}))
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "image "+dg.String()+" is on this node") {
			t.Errorf("%s: %v, want PermissionDenied naming the image", tt.name, err)
		}
		if _, mounted, _ := cfs.IsMounted(target); mounted {
			t.Errorf("%s: the private image was mounted for the attacker", tt.name)
		}
		if attacker.requests("/images/x.cfs") == 0 {
			t.Errorf("%s: the attacker's source was not asked", tt.name)
		}
	}
}

// TestNamingObjectsIsNotAccess: an image crafted by the attacker, served
// by its own repository, lists the digests of another volume's private
// files; its server has none of them (404, or an empty 200): refused with
// PermissionDenied naming an object, nothing mounted.
func TestNamingObjectsIsNotAccess(t *testing.T) {
	needRoot(t)
	e := newTestEnv(t, Config{})
	node := e.grpcNode(t)
	_, dg, _ := publishVictim(t, e, node)
	objs := objectsOf(t, e.store.ImagePath(dg))
	for _, mode := range []string{"404", "empty 200"} {
		dir := t.TempDir()
		craftImage(t, dir, "evil.cfs", objs)
		files := http.FileServer(http.Dir(dir))
		attacker := newHostileServer(t, func(w http.ResponseWriter, r *http.Request) {
			if strings.HasPrefix(r.URL.Path, "/objects/") && mode == "empty 200" {
				w.WriteHeader(http.StatusOK)
				return
			}
			files.ServeHTTP(w, r)
		})
		target := filepath.Join(t.TempDir(), "attacker")
		cleanupMounts(t, target)
		_, err := node.NodePublishVolume(context.Background(), publishReq("attacker", target,
			map[string]string{"repository": attacker.URL, "image": "evil.cfs"}))
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "object ") {
			t.Errorf("%s: %v, want PermissionDenied naming an object", mode, err)
		}
		if _, mounted, _ := cfs.IsMounted(target); mounted {
			t.Errorf("%s: the crafted image was mounted", mode)
		}
		if attacker.requests("/objects/") == 0 {
			t.Errorf("%s: the attacker's source was not asked for the objects", mode)
		}
	}
}

// TestTrustSharedContent: with --trust-shared-content the store serves
// what it has to whoever names it (the crafted image then reads the
// victim's files) and asks the source nothing about it.
func TestTrustSharedContent(t *testing.T) {
	needRoot(t)
	e := newTestEnv(t, Config{TrustSharedContent: true})
	node := e.grpcNode(t)
	_, dg, _ := publishVictim(t, e, node)
	objs := objectsOf(t, e.store.ImagePath(dg))
	dir := t.TempDir()
	craftImage(t, dir, "evil.cfs", objs)
	files := http.FileServer(http.Dir(dir))
	attacker := newHostileServer(t, files.ServeHTTP)
	target := filepath.Join(t.TempDir(), "attacker")
	cleanupMounts(t, target)
	if _, err := node.NodePublishVolume(context.Background(), publishReq("attacker", target,
		map[string]string{"repository": attacker.URL, "image": "evil.cfs"})); err != nil {
		t.Fatalf("with --trust-shared-content: %v", err)
	}
	defer node.NodeUnpublishVolume(context.Background(), unpublishReq("attacker", target))
	if n := attacker.requests("/objects/"); n != 0 {
		t.Errorf("%d object requests: proofs were made", n)
	}
	got, err := os.ReadFile(filepath.Join(target, "stolen0"))
	if err != nil || len(got) == 0 {
		t.Fatalf("reading shared content: %v", err)
	}
	if c := e.store.Counters(); c.Proofs != 0 || c.ProofBytes != 0 {
		t.Errorf("counters %+v: proofs were made", c)
	}
}

// TestProvenanceAcrossRestart: the principal that fetched content publishes
// it again after a plugin restart without any request to its source; a new
// principal with valid credentials proves possession once.
func TestProvenanceAcrossRestart(t *testing.T) {
	needRoot(t)
	e := newTestEnv(t, Config{})
	if !xattrsWork(t, e.root) {
		t.Skip("the store's filesystem refuses user xattrs: provenance is kept in memory only")
	}
	node := e.grpcNode(t)
	victim, dg, target := publishVictim(t, e, node)
	if _, err := node.NodeUnpublishVolume(context.Background(), unpublishReq("victim", target)); err != nil {
		t.Fatal(err)
	}
	e.close()
	e.open(Config{})
	node = e.grpcNode(t)
	before := victim.requests("/")
	vc := map[string]string{"repository": victim.srv.URL, "image": "private.cfs", "digest": dg.String()}
	again := filepath.Join(t.TempDir(), "again")
	cleanupMounts(t, again)
	req := publishReq("again", again, vc)
	req.Secrets = map[string]string{"token": "victim-token"}
	if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if n := victim.requests("/") - before; n != 0 {
		t.Errorf("after a restart, the same principal made %d requests for content it delivered", n)
	}
	// pullPolicy Never serves what the principal showed before.
	never := filepath.Join(t.TempDir(), "never")
	cleanupMounts(t, never)
	vcNever := map[string]string{"repository": victim.srv.URL, "image": "private.cfs", "digest": dg.String(), "pullPolicy": "Never"}
	req = publishReq("never", never, vcNever)
	req.Secrets = map[string]string{"token": "victim-token"}
	if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatalf("pullPolicy Never, same principal: %v", err)
	}
	req = publishReq("never2", filepath.Join(t.TempDir(), "never2"), vcNever)
	req.Secrets = map[string]string{"token": "someone-else"}
	if _, err := node.NodePublishVolume(context.Background(), req); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("pullPolicy Never, another principal: %v, want FailedPrecondition", err)
	}
	for vol, tg := range map[string]string{"again": again, "never": never} {
		if _, err := node.NodeUnpublishVolume(context.Background(), unpublishReq(vol, tg)); err != nil {
			t.Fatal(err)
		}
	}
	// Another user of the same repository with its own (valid) token
	// proves possession: one request for the image, one per object.
	victim.mu.Lock()
	victim.token = ""
	victim.mu.Unlock()
	objs := objectsOf(t, e.store.ImagePath(dg))
	before = victim.requests("/")
	other := filepath.Join(t.TempDir(), "other")
	cleanupMounts(t, other)
	req = publishReq("other", other, vc)
	req.Secrets = map[string]string{"token": "other-token"}
	if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if n := victim.requests("/") - before; n != 1+len(objs) {
		t.Errorf("a new principal made %d requests, want 1 for the image and %d for the objects", n, len(objs))
	}
	if _, err := node.NodeUnpublishVolume(context.Background(), unpublishReq("other", other)); err != nil {
		t.Fatal(err)
	}
}

func xattrsWork(t *testing.T, dir string) bool {
	p := filepath.Join(dir, "xattr-probe")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(p)
	return setUserXattr(p) == nil
}

// sharedFiles returns n files with sizes spread as in a root filesystem
// (many small files, a few large ones), seeded; files at index >= n-own
// are unique to seed, the others are common to every seed.
func sharedFiles(n, own int, seed uint64) map[string]string {
	r := rand.New(rand.NewPCG(1, 2))
	m := make(map[string]string, n)
	for i := 0; i < n; i++ {
		size := 100 << r.IntN(11) // 100 B … 200 KiB
		size += r.IntN(size)
		s := uint64(0)
		if i >= n-own {
			s = seed
		}
		var key [32]byte
		key[0], key[1], key[2] = byte(i), byte(i>>8), byte(s)
		b := make([]byte, size)
		_, _ = rand.NewChaCha8(key).Read(b)
		m[fmt.Sprintf("f/%04d", i)] = string(b)
	}
	return m
}

// TestSecondSourceSharing90Percent measures what isolation costs: a second
// source (another repository, other credentials) whose image shares 90 %
// of its objects with content already on the node pays one request per
// shared object and at most 16 KiB (small objects) or 4 KiB (one block)
// each, instead of downloading them. It prints the figures.
func TestSecondSourceSharing90Percent(t *testing.T) {
	needRoot(t)
	const n, own = 200, 20
	e := newTestEnv(t, Config{})
	node := e.grpcNode(t)
	// One repository directory holds both images; the second source is
	// another URL of it (a symlinked mirror path) with a token.
	repo := newTestRepo(t)
	repo.writeImage(t, "a.cfs", sharedFiles(n, own, 1))
	dgB := repo.writeImage(t, "b.cfs", sharedFiles(n, own, 2))
	if err := os.Symlink(".", filepath.Join(repo.dir, "mirror")); err != nil {
		t.Fatal(err)
	}
	publish := func(url, image, vol, token string) {
		t.Helper()
		target := filepath.Join(t.TempDir(), vol)
		cleanupMounts(t, target)
		req := publishReq(vol, target, map[string]string{"repository": url, "image": image})
		if token != "" {
			req.Secrets = map[string]string{"token": token}
		}
		if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _ = node.NodeUnpublishVolume(context.Background(), unpublishReq(vol, target)) })
	}
	publish(repo.srv.URL, "a.cfs", "a", "")
	firstObjects := map[cfs.Digest]bool{}
	for _, o := range objectsOf(t, e.store.ImagePath(repo.digestOf(t, "a.cfs"))) {
		firstObjects[o.Digest] = true
	}
	before := e.store.Counters()
	publish(repo.srv.URL+"/mirror", "b.cfs", "b", "b")
	after := e.store.Counters()

	objs := objectsOf(t, e.store.ImagePath(dgB))
	var sharedBytes, maxProof uint64
	shared := 0
	for _, o := range objs {
		if firstObjects[o.Digest] {
			shared++
			sharedBytes += o.Size
			if o.Size <= 16<<10 {
				maxProof += o.Size
			} else {
				maxProof += 4096
			}
		}
	}
	proofs := after.Proofs - before.Proofs
	proofBytes := after.ProofBytes - before.ProofBytes
	fetched := after.ObjectsFetched - before.ObjectsFetched
	fetchedBytes := after.ObjectBytesFetched - before.ObjectBytesFetched
	t.Logf("second source, %d of %d objects shared (%d KiB of %d KiB): %d requests to it (1 image + %d downloads + %d proofs); "+
		"extra for isolation: %d requests, %d KiB (%.1f%% of the shared bytes; downloads: %d KiB)",
		shared, len(objs), sharedBytes>>10, (sharedBytes+fetchedBytes)>>10, repo.requests("/mirror/"), fetched, proofs,
		proofs, proofBytes>>10, 100*float64(proofBytes)/float64(sharedBytes), fetchedBytes>>10)
	if int(proofs) != shared || int(fetched) != len(objs)-shared || repo.requests("/mirror/objects/") != len(objs) {
		t.Errorf("%d proofs and %d downloads (%d object requests), want %d and %d", proofs, fetched, repo.requests("/mirror/objects/"), shared, len(objs)-shared)
	}
	if proofBytes > maxProof {
		t.Errorf("proofs received %d bytes, more than the %d they may", proofBytes, maxProof)
	}
}

// writeImage writes files (path → content, all external objects) and an
// image of them into the repository, faster than publish (no fsync).
func (r *testRepo) writeImage(t *testing.T, name string, files map[string]string) cfs.Digest {
	t.Helper()
	var dump strings.Builder
	dump.WriteString("/ 0 40755 2 0 0 0 0.0 - - -\n/f 0 40755 2 0 0 0 0.0 - - -\n")
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	for _, p := range paths {
		data := []byte(files[p])
		d := cfs.VerityDigestOf(data)
		obj := filepath.Join(r.dir, "objects", d.ObjectPath())
		if err := os.MkdirAll(filepath.Dir(obj), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(obj, data, 0o644); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&dump, "/%s %d 100644 1 0 0 0 0.0 %s - %s\n", p, len(data), d.ObjectPath(), d)
	}
	root, err := cfs.ParseDump(strings.NewReader(dump.String()), cfs.DumpOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(r.dir, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	d, err := cfs.WriteImageFile(filepath.Join(r.dir, "images", name), root, cfs.DefaultWriteOptions())
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// digestOf returns the digest of the repository's image name.
func (r *testRepo) digestOf(t *testing.T, name string) cfs.Digest {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(r.dir, "images", name))
	if err != nil {
		t.Fatal(err)
	}
	return cfs.VerityDigestOf(b)
}

// TestQuarantinedImageKeepsVolume: one flipped byte in the image file of a
// mounted volume makes Verify quarantine it; GC with a 1-byte budget and no
// grace then removes none of the volume's objects (every file still
// reads), the volume reports an abnormal condition naming the image, and
// publishing it again fetches the image again.
func TestQuarantinedImageKeepsVolume(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	files := sampleFiles(21)
	dg := repo.publish(t, "app", files)
	e := &testEnv{t: t, root: t.TempDir(), storeOpts: fetchOptionsNoGrace()}
	e.open(Config{})
	node := e.grpcNode(t)
	vc := map[string]string{"repository": repo.srv.URL, "image": "app", "digest": dg.String()}
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	if _, err := node.NodePublishVolume(context.Background(), publishReq("v", target, vc)); err != nil {
		t.Fatal(err)
	}
	// Byte 512 is in the padding after the composefs header: the mount
	// never reads it, but the file's digest changes.
	f, err := os.OpenFile(e.store.ImagePath(dg), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0x5a}, 512); err != nil {
		t.Fatal(err)
	}
	f.Close()
	rep, err := e.d.RunVerify(context.Background())
	if err != nil || len(rep.Corrupt) != 1 || !strings.Contains(rep.Corrupt[0].Path, dg.String()) {
		t.Fatalf("verify: %+v, %v; want the image quarantined", rep, err)
	}
	time.Sleep(time.Millisecond) // past the (1ns) grace
	st, err := e.d.RunGC(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.ObjectsRemoved != 0 {
		t.Errorf("GC removed %d objects of a mounted volume", st.ObjectsRemoved)
	}
	for name, content := range files {
		got, err := os.ReadFile(filepath.Join(target, name))
		if err != nil || string(got) != content {
			t.Errorf("%s after verify and GC: %v", name, err)
		}
	}
	resp, err := node.NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: "v", VolumePath: target})
	if err != nil {
		t.Fatalf("stats: %v, want an abnormal condition", err)
	}
	if c := resp.GetVolumeCondition(); !c.GetAbnormal() || !strings.Contains(c.GetMessage(), dg.String()) {
		t.Errorf("condition %+v, want abnormal naming the image", c)
	}
	before := repo.requests("/images/")
	again := filepath.Join(t.TempDir(), "again")
	cleanupMounts(t, again)
	if _, err := node.NodePublishVolume(context.Background(), publishReq("v2", again, vc)); err != nil {
		t.Fatalf("republish: %v", err)
	}
	if repo.requests("/images/") == before {
		t.Error("the republish did not fetch the image again")
	}
	for name, content := range files {
		if got, err := os.ReadFile(filepath.Join(again, name)); err != nil || string(got) != content {
			t.Errorf("%s in the republished volume: %v", name, err)
		}
	}
	for vol, tg := range map[string]string{"v": target, "v2": again} {
		if _, err := node.NodeUnpublishVolume(context.Background(), unpublishReq(vol, tg)); err != nil {
			t.Fatal(err)
		}
	}
}
