package oci

import (
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// mirrorSetup is a registry and a mirror holding a copy of its artifact
// team/app:v1 (pushed to both: pushes are deterministic).
type mirrorSetup struct {
	up, mirror *testRegistry
	dir        string
	ref        Reference
	digest     cfs.Digest
}

func newMirrorSetup(t *testing.T) *mirrorSetup {
	t.Helper()
	m := &mirrorSetup{up: newTestRegistry(t), mirror: newTestRegistry(t), dir: t.TempDir()}
	writeTree(t, m.dir, seeds(60, 1), testSize)
	m.ref = m.up.ref(t, "team/app:v1")
	res := pushDir(t, m.up.client(t, m.ref), m.dir, PushOptions{PackSize: 1 << 20})
	copyRes := pushDir(t, m.mirror.client(t, m.mirror.ref(t, "team/app:v1")), m.dir, PushOptions{PackSize: 1 << 20})
	if copyRes.Manifest.Digest != res.Manifest.Digest {
		t.Fatalf("the mirror's copy has manifest %s, the registry's %s", copyRes.Manifest.Digest, res.Manifest.Digest)
	}
	m.digest = res.Digest
	return m
}

// client reaches the registry with the mirrors (URLs) in front of it.
func (m *mirrorSetup) client(t *testing.T, mirrors ...string) *Client {
	t.Helper()
	c, err := NewClient(m.ref, Options{Insecure: []string{m.up.host}, Mirrors: map[string][]string{m.up.host: mirrors}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// retryingStore is a store that retries transient failures at once.
func retryingStore(t *testing.T) *fetch.Store {
	t.Helper()
	s, err := fetch.Open(context.Background(), t.TempDir(), fetch.Options{Retries: 2, RetryBaseDelay: time.Millisecond, RetryMaxDelay: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// pathLog records the paths (and ns query) of the requests a registry sees.
type pathLog struct {
	mu    sync.Mutex
	paths []string
	ns    []string
}

func (l *pathLog) watch(r *testRegistry) {
	f := func(_ http.ResponseWriter, req *http.Request) bool {
		l.mu.Lock()
		l.paths = append(l.paths, req.URL.Path)
		l.ns = append(l.ns, req.URL.Query().Get("ns"))
		l.mu.Unlock()
		return false
	}
	r.Intercept.Store(&f)
}

// A mirror holding the blobs serves all of them: the registry serves the
// manifest only, and the mirror is told which registry it stands for.
func TestMirrorServesBlobs(t *testing.T) {
	m := newMirrorSetup(t)
	var seen pathLog
	seen.watch(m.mirror)
	m.up.reset()
	m.mirror.reset()
	s := openStore(t)
	if _, err := pull(t, s, NewArtifactSource(m.client(t, "http://"+m.mirror.host), m.ref), "v1"); err != nil {
		t.Fatal(err)
	}
	checkObjects(t, s, m.digest, m.dir)
	_, upGets, _ := m.up.counts()
	_, mGets, mBytes := m.mirror.counts()
	t.Logf("the mirror served %d blob GETs (%d bytes), the registry %d", mGets, mBytes, upGets)
	if upGets != 0 || mGets == 0 {
		t.Fatalf("the registry served %d blob GETs and the mirror %d: want every blob from the mirror", upGets, mGets)
	}
	for i, p := range seen.paths {
		if !strings.Contains(p, "/blobs/") {
			t.Errorf("the mirror was asked for %s: only blobs go to mirrors", p)
		}
		if seen.ns[i] != m.up.host {
			t.Errorf("request %s to the mirror has ns=%q, want %q", p, seen.ns[i], m.up.host)
		}
	}
}

// Mirrors that fail (nothing listening, errors, a cache without the
// blobs) are passed over: the registry serves the blobs.
func TestMirrorBrokenFallsBackToRegistry(t *testing.T) {
	m := newMirrorSetup(t)
	failing := newTestRegistry(t)
	fail := func(w http.ResponseWriter, _ *http.Request) bool {
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
		return true
	}
	failing.Intercept.Store(&fail)
	empty := newTestRegistry(t)
	for _, tc := range []struct {
		name    string
		mirrors []string
	}{
		{"nothing listening", []string{"http://127.0.0.1:1"}},
		{"503 for everything", []string{"http://" + failing.host}},
		{"not cached (404)", []string{"http://" + empty.host}},
		{"all three in turn", []string{"http://127.0.0.1:1", "http://" + failing.host, "http://" + empty.host}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m.up.reset()
			s := openStore(t)
			if _, err := pull(t, s, NewArtifactSource(m.client(t, tc.mirrors...), m.ref), "v1"); err != nil {
				t.Fatal(err)
			}
			checkObjects(t, s, m.digest, m.dir)
			if _, gets, _ := m.up.counts(); gets == 0 {
				t.Fatalf("the registry served no blob")
			}
		})
	}
}

// flipAll makes a registry change one byte of every blob body it serves.
func flipAll(r *testRegistry) {
	f := func(_ string, body []byte) []byte {
		if len(body) == 0 {
			return body
		}
		b := append([]byte(nil), body...)
		b[len(b)/2] ^= 0x20
		return b
	}
	r.Tamper.Store(&f)
}

// A mirror serving wrong bytes (every blob: the image, the object index,
// the packs' runs) is caught by the digests, and the node reads those
// blobs from the registry: the pull succeeds with the right content, and
// the client does not ask the mirror for them again.
func TestMirrorLyingCaughtByDigests(t *testing.T) {
	m := newMirrorSetup(t)
	flipAll(m.mirror)
	c := m.client(t, "http://"+m.mirror.host)
	m.up.reset()
	m.mirror.reset()
	s := retryingStore(t)
	st, err := pull(t, s, NewArtifactSource(c, m.ref), "v1")
	if err != nil {
		t.Fatalf("a lying mirror broke the pull: %v", err)
	}
	checkObjects(t, s, m.digest, m.dir)
	_, upGets, _ := m.up.counts()
	_, mGets, _ := m.mirror.counts()
	t.Logf("the mirror served %d wrong blob bodies; the registry served %d blob GETs; %d objects", mGets, upGets, st.Fetched)
	if mGets == 0 || upGets == 0 {
		t.Fatalf("mirror %d and registry %d blob GETs: want the mirror asked first, then the registry", mGets, upGets)
	}
	m.mirror.reset()
	if _, err := pull(t, retryingStore(t), NewArtifactSource(c, m.ref), "v1"); err != nil {
		t.Fatal(err)
	}
	if _, gets, _ := m.mirror.counts(); gets != 0 {
		t.Fatalf("the mirror that lied was asked %d times again for the same blobs", gets)
	}
}

// A container image's layer from a lying mirror is converted again from
// the registry's: the same digest as without a mirror.
func TestMirrorLyingLayer(t *testing.T) {
	up, mirror := newTestRegistry(t), newTestRegistry(t)
	img := testImage(t, layerTar(t, []tarEntry{dirE("usr/"), fileE("usr/a", strings.Repeat("a", 5000))}),
		layerTar(t, []tarEntry{fileE("usr/b", strings.Repeat("b", 5000))}))
	pushImage(t, up.host, "app:1", img)
	pushImage(t, mirror.host, "app:1", img)
	want, err := convert(t, openStore(t), up, "app:1")
	if err != nil {
		t.Fatal(err)
	}
	flipAll(mirror)
	ref, _ := ParseReference("docker://" + up.host + "/app:1")
	c, err := NewClient(ref, Options{Insecure: []string{up.host}, Mirrors: map[string][]string{up.host: {"http://" + mirror.host}}})
	if err != nil {
		t.Fatal(err)
	}
	up.reset()
	s := retryingStore(t)
	src := NewImageSource(c, ref, ConvertLimits{})
	d, err := s.EnsureImage(context.Background(), src, fetch.ImageRef{Name: ref.Name()})
	if err != nil || d != want {
		t.Fatalf("through a lying mirror: %s, %v; want %s", d, err, want)
	}
	if _, gets, _ := mirror.counts(); gets == 0 {
		t.Fatalf("the mirror was not asked")
	}
	if _, gets, _ := up.counts(); gets == 0 {
		t.Fatalf("the registry served no layer")
	}
}

// Proofs of possession read from the registry itself, with the
// credentials: a mirror serves anyone, so what it holds proves nothing.
func TestMirrorNotUsedForProofs(t *testing.T) {
	m := newMirrorSetup(t)
	c := m.client(t, "http://"+m.mirror.host)
	src := NewArtifactSource(c, m.ref)
	s := openStore(t)
	if _, err := pull(t, s, src, "v1"); err != nil {
		t.Fatal(err)
	}
	objs, err := s.Objects(context.Background(), m.digest)
	if err != nil || len(objs) == 0 {
		t.Fatal(objs, err)
	}
	o := objs[0]
	m.up.reset()
	m.mirror.reset()
	body, _, err := src.OpenObjectRange(context.Background(), o.Digest, o.Size, 0, int64(min(o.Size, 4096)))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, body)
	body.Close()
	_, upGets, _ := m.up.counts()
	_, mGets, _ := m.mirror.counts()
	if upGets != 1 || mGets != 0 {
		t.Fatalf("a proof read made %d blob GETs at the registry and %d at the mirror, want 1 and 0", upGets, mGets)
	}
}
