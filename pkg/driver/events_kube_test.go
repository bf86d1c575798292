package driver

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/rest"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// fakeAPIServer records the core/v1 Events POSTed to it.
type fakeAPIServer struct {
	srv    *httptest.Server
	mu     sync.Mutex
	bodies [][]byte
	events chan corev1.Event
}

func newFakeAPIServer(t *testing.T) *fakeAPIServer {
	t.Helper()
	a := &fakeAPIServer{events: make(chan corev1.Event, 16)}
	a.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/api/v1/namespaces/") ||
			!strings.HasSuffix(r.URL.Path, "/events") || r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "unexpected "+r.Method+" "+r.URL.Path, http.StatusForbidden)
			return
		}
		var ev corev1.Event
		if err := json.Unmarshal(body, &ev); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if ns := strings.Split(r.URL.Path, "/")[4]; ns != ev.Namespace {
			http.Error(w, "namespace of the path and the event differ", http.StatusBadRequest)
			return
		}
		a.mu.Lock()
		a.bodies = append(a.bodies, body)
		a.mu.Unlock()
		a.events <- ev
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write(body)
	}))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *fakeAPIServer) config() *rest.Config {
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.srv.Certificate().Raw})
	return &rest.Config{Host: a.srv.URL, BearerToken: "tok", TLSClientConfig: rest.TLSClientConfig{CAData: ca}}
}

func (a *fakeAPIServer) next(t *testing.T) corev1.Event {
	t.Helper()
	select {
	case ev := <-a.events:
		return ev
	case <-time.After(30 * time.Second):
		t.Fatal("no event posted")
		return corev1.Event{}
	}
}

func newTestKubeRecorder(t *testing.T, a *fakeAPIServer) *KubeRecorder {
	t.Helper()
	k, err := NewKubeRecorder(context.Background(), a.config(), "composefs.csi.dev", "node-1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Close)
	return k
}

func TestKubeRecorderPostsPodEvent(t *testing.T) {
	a := newFakeAPIServer(t)
	k := newTestKubeRecorder(t, a)
	k.PodEvent(context.Background(), PodInfo{Name: "web-0", Namespace: "shop", UID: "u1"}, true, ReasonFetchFailed, "image x: not found")
	ev := a.next(t)
	obj := ev.InvolvedObject
	if obj.Kind != "Pod" || obj.APIVersion != "v1" || obj.Namespace != "shop" || obj.Name != "web-0" || obj.UID != "u1" {
		t.Errorf("involvedObject %+v", obj)
	}
	if ev.Type != corev1.EventTypeWarning || ev.Reason != ReasonFetchFailed || ev.Message != "image x: not found" {
		t.Errorf("type %q reason %q message %q", ev.Type, ev.Reason, ev.Message)
	}
	if ev.Source.Component != "composefs.csi.dev" || ev.Source.Host != "node-1" || ev.Namespace != "shop" {
		t.Errorf("source %+v namespace %q", ev.Source, ev.Namespace)
	}

	// Normal events, long messages cut to the limit, events without a pod dropped.
	k.PodEvent(context.Background(), PodInfo{}, true, ReasonFetchFailed, "no pod")
	k.PodEvent(context.Background(), PodInfo{Name: "web-1", Namespace: "shop"}, false, "Fetched", strings.Repeat("m", 1100))
	ev = a.next(t)
	if ev.InvolvedObject.Name != "web-1" || ev.Type != corev1.EventTypeNormal || len(ev.Message) != maxEventMessage {
		t.Errorf("event on %q type %q with %d bytes of message", ev.InvolvedObject.Name, ev.Type, len(ev.Message))
	}
	k.Close()
	k.Close()
	k.PodEvent(context.Background(), PodInfo{Name: "web-2", Namespace: "shop"}, true, ReasonFetchFailed, "after close")
}

// A final publish failure reaches the API server as a warning on the pod,
// and neither the secrets nor kubelet's service account token (a
// volume_context value) appear in what is posted.
func TestPodEventsToAPIServer(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	repo.publish(t, "app", sampleFiles(4))
	a := newFakeAPIServer(t)
	e := newTestEnv(t, Config{}, WithEventRecorder(newTestKubeRecorder(t, a)))
	const secretTok, saTok = "s3cr3t-registry-token", "kubelet-sa-token-value"
	req := publishReq("v", filepath.Join(t.TempDir(), "vol"), map[string]string{
		"repository":                               repo.srv.URL,
		"image":                                    "missing",
		"csi.storage.k8s.io/pod.name":              "web-0",
		"csi.storage.k8s.io/pod.namespace":         "shop",
		"csi.storage.k8s.io/pod.uid":               "0f1e2d3c",
		"csi.storage.k8s.io/serviceAccount.name":   "default",
		"csi.storage.k8s.io/serviceAccount.tokens": `{"":{"token":"` + saTok + `","expirationTimestamp":"2030-01-01T00:00:00Z"}}`,
	})
	req.Secrets = map[string]string{"username": "bob", "password": "hunter2-pass", "token": secretTok}
	if _, err := e.d.NodePublishVolume(context.Background(), req); err == nil {
		t.Fatal("publish succeeded")
	}
	ev := a.next(t)
	if ev.InvolvedObject.Kind != "Pod" || ev.InvolvedObject.Name != "web-0" || ev.InvolvedObject.Namespace != "shop" ||
		ev.InvolvedObject.UID != "0f1e2d3c" || ev.Type != corev1.EventTypeWarning || ev.Reason != ReasonFetchFailed ||
		!strings.Contains(ev.Message, "missing") {
		t.Errorf("event %+v", ev)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, b := range a.bodies {
		for _, v := range []string{secretTok, saTok, "hunter2-pass"} {
			if bytes.Contains(b, []byte(v)) {
				t.Errorf("posted event carries %q: %s", v, b)
			}
		}
	}
}

// Without an in-cluster config events are off: the driver logs them and
// nothing panics.
func TestEventsOffWithoutInClusterConfig(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	if _, err := NewInClusterRecorder(context.Background(), "c", "n"); !errors.Is(err, ErrNotInCluster) {
		t.Fatalf("got %v, want ErrNotInCluster", err)
	}
	if _, err := os.Stat("/var/run/secrets/kubernetes.io/serviceaccount/token"); err == nil {
		t.Skip("running in a pod")
	}
	// The environment of a pod but no service account mounted.
	t.Setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
	t.Setenv("KUBERNETES_SERVICE_PORT", "6443")
	if _, err := NewInClusterRecorder(context.Background(), "c", "n"); !errors.Is(err, ErrNotInCluster) {
		t.Fatalf("got %v, want ErrNotInCluster", err)
	}
	d := &Driver{events: logRecorder{}}
	d.reportFailure(context.Background(), PodInfo{Name: "web-0", Namespace: "shop"}, fmt.Errorf("image x: %w", fetch.ErrNotFound))
	d.closeEvents()
}

// Driver.Close shuts the recorder down.
func TestCloseStopsEventRecorder(t *testing.T) {
	rec := &closingRecorder{}
	e := newTestEnv(t, Config{}, WithEventRecorder(rec))
	e.close()
	if rec.closed != 1 {
		t.Fatalf("recorder closed %d times, want 1", rec.closed)
	}
}

type closingRecorder struct {
	fakeRecorder
	closed int
}

func (c *closingRecorder) Close() { c.closed++ }
