package oci

import (
	"context"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// protoLog records the protocol of every request a TLS front of the test
// registry (HTTP/2 by ALPN, as registries serve) receives.
type protoLog struct {
	mu     sync.Mutex
	reqs   map[string][]int // "manifest", "range", "blob": HTTP major versions
	byPath map[string]int   // the last request of each path
}

func (l *protoLog) kind(r *http.Request) string {
	switch {
	case strings.Contains(r.URL.Path, "/manifests/"):
		return "manifest"
	case strings.Contains(r.URL.Path, "/blobs/") && r.Header.Get("Range") != "":
		return "range"
	case strings.Contains(r.URL.Path, "/blobs/"):
		return "blob"
	}
	return "other"
}

func (l *protoLog) protos(kind string) []int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.reqs[kind]
}

// tlsFront serves reg's content over TLS with HTTP/2 enabled and returns
// a client of ref's repository there that trusts it (its own transports,
// as the node builds them) and the log of requests.
func tlsFront(t *testing.T, reg *testRegistry, scheme, repo string) (*Client, Reference, *protoLog) {
	t.Helper()
	l := &protoLog{reqs: map[string][]int{}, byPath: map[string]int{}}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		l.mu.Lock()
		k := l.kind(r)
		l.reqs[k] = append(l.reqs[k], r.ProtoMajor)
		l.byPath[r.URL.Path] = r.ProtoMajor
		l.mu.Unlock()
		reg.Srv.Config.Handler.ServeHTTP(w, r)
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	ref, err := ParseReference(scheme + "://" + strings.TrimPrefix(srv.URL, "https://") + "/" + repo)
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewClient(ref, Options{CA: ca})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.CloseIdleConnections)
	return c, ref, l
}

func allOf(ps []int, want int) bool {
	for _, p := range ps {
		if p != want {
			return false
		}
	}
	return len(ps) > 0
}

// The long bodies of a pull (the pack runs of an artifact, the layers of an
// image) are read over HTTP/1.1, one connection each, even from a registry
// that speaks HTTP/2; manifests and small blobs keep HTTP/2 (bench/README.md,
// "HTTP/1.1 for the long bodies of OCI pulls").
func TestLongBodiesOverHTTP1(t *testing.T) {
	reg := newTestRegistry(t)
	dir := t.TempDir()
	writeTree(t, dir, seeds(60, 1), testSize)
	pushDir(t, reg.client(t, reg.ref(t, "team/app:v1")), dir, PushOptions{PackSize: 256 << 10})
	img := testImage(t, layerTar(t, []tarEntry{
		dirE("etc/"), fileE("etc/big", strings.Repeat("0123456789abcdef", 8<<10)), fileE("etc/small", "tiny")}))
	pushImage(t, reg.host, "team/plain:v1", img)

	t.Run("artifact", func(t *testing.T) {
		c, ref, l := tlsFront(t, reg, "oci", "team/app:v1")
		s := openStore(t)
		st, err := pull(t, s, NewArtifactSource(c, ref), "v1")
		if err != nil {
			t.Fatal(err)
		}
		d, err := s.EnsureImage(context.Background(), NewArtifactSource(c, ref), fetch.ImageRef{Name: "v1"})
		if err != nil {
			t.Fatal(err)
		}
		checkObjects(t, s, d, dir)
		if st.Fetched == 0 {
			t.Fatal("nothing fetched")
		}
		if ps := l.protos("range"); !allOf(ps, 1) {
			t.Errorf("pack runs over HTTP/%v, want 1 each", ps)
		}
		if ps := l.protos("manifest"); !allOf(ps, 2) {
			t.Errorf("manifests over HTTP/%v, want 2 each", ps)
		}
		if ps := l.protos("blob"); !allOf(ps, 2) { // the image layer and the object index
			t.Errorf("whole blobs over HTTP/%v, want 2 each", ps)
		}
	})
	t.Run("image", func(t *testing.T) {
		c, ref, l := tlsFront(t, reg, "docker", "team/plain:v1")
		src := NewImageSource(c, ref, ConvertLimits{})
		s := openStore(t)
		d, err := s.EnsureImage(context.Background(), src, fetch.ImageRef{Name: ref.Name()})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.EnsureObjects(context.Background(), src, d); err != nil {
			t.Fatal(err)
		}
		ls, err := img.Layers()
		if err != nil {
			t.Fatal(err)
		}
		ld, _ := ls[0].Digest()
		cd, _ := img.ConfigName()
		blobs := "/v2/team/plain/blobs/"
		l.mu.Lock()
		layer, config := l.byPath[blobs+ld.String()], l.byPath[blobs+cd.String()]
		l.mu.Unlock()
		if layer != 1 || config != 2 {
			t.Errorf("layer over HTTP/%d, config over HTTP/%d; want 1 and 2", layer, config)
		}
	})
}
