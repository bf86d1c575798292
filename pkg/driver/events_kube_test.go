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
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// fakeAPIServer records the core/v1 Events POSTed to it and the PATCHes of
// their counts, answering as the API server does.
type fakeAPIServer struct {
	srv     *httptest.Server
	mu      sync.Mutex
	bodies  [][]byte
	token   string // the bearer token it accepts
	fail    int    // the next this many requests get 503
	patchTo int    // the status PATCHes get (0: 200)
	events  chan corev1.Event
	patches chan eventPatch
}

// eventPatch is a PATCH of a posted event.
type eventPatch struct {
	path, contentType string
	body              []byte
}

func newFakeAPIServer(t *testing.T) *fakeAPIServer {
	t.Helper()
	a := &fakeAPIServer{token: "tok", events: make(chan corev1.Event, 64), patches: make(chan eventPatch, 64)}
	a.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		a.mu.Lock()
		token, fail, patchTo := a.token, a.fail, a.patchTo
		if fail > 0 {
			a.fail--
		}
		a.mu.Unlock()
		if fail > 0 {
			http.Error(w, `{"kind":"Status","message":"etcd is busy"}`, http.StatusServiceUnavailable)
			return
		}
		if r.Header.Get("Authorization") != "Bearer "+token {
			http.Error(w, `{"kind":"Status","message":"forbidden"}`, http.StatusForbidden)
			return
		}
		parts := strings.Split(r.URL.Path, "/") // "", api, v1, namespaces, NS, events[, NAME]
		if len(parts) < 6 || parts[1] != "api" || parts[2] != "v1" || parts[3] != "namespaces" || parts[5] != "events" {
			http.Error(w, "unexpected "+r.Method+" "+r.URL.Path, http.StatusNotFound)
			return
		}
		switch {
		case r.Method == http.MethodPatch && len(parts) == 7:
			a.patches <- eventPatch{path: r.URL.Path, contentType: r.Header.Get("Content-Type"), body: body}
			if patchTo != 0 {
				http.Error(w, `{"kind":"Status","message":"not found"}`, patchTo)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write([]byte(`{"kind":"Event","apiVersion":"v1","metadata":{"name":"` + path.Base(r.URL.Path) + `"}}`))
		case r.Method == http.MethodPost && len(parts) == 6:
			var ev corev1.Event
			if err := json.Unmarshal(body, &ev); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			if parts[4] != ev.Namespace {
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
		default:
			http.Error(w, "unexpected "+r.Method+" "+r.URL.Path, http.StatusMethodNotAllowed)
		}
	}))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *fakeAPIServer) config() KubeConfig {
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.srv.Certificate().Raw})
	return KubeConfig{Host: a.srv.URL, Token: "tok", CAData: ca}
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

func (a *fakeAPIServer) nextPatch(t *testing.T) eventPatch {
	t.Helper()
	select {
	case p := <-a.patches:
		return p
	case ev := <-a.events:
		t.Fatalf("an event was posted (%q on %s), want a patch", ev.Message, ev.InvolvedObject.Name)
	case <-time.After(30 * time.Second):
		t.Fatal("no patch")
	}
	return eventPatch{}
}

func newTestKubeRecorder(t *testing.T, cfg KubeConfig) *KubeRecorder {
	t.Helper()
	k, err := NewKubeRecorder(context.Background(), cfg, "composefs.csi.dev", "node-1")
	if err != nil {
		t.Fatal(err)
	}
	k.retryWait = time.Millisecond
	t.Cleanup(k.Close)
	return k
}

func TestKubeRecorderPostsPodEvent(t *testing.T) {
	a := newFakeAPIServer(t)
	k := newTestKubeRecorder(t, a.config())
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
	if ev.Count != 1 || ev.FirstTimestamp.IsZero() || !ev.LastTimestamp.Equal(&ev.FirstTimestamp) ||
		!strings.HasPrefix(ev.Name, "web-0.") || ev.ReportingController != "composefs.csi.dev" || ev.ReportingInstance != "node-1" {
		t.Errorf("name %q count %d first %v last %v reporting %q %q", ev.Name, ev.Count, ev.FirstTimestamp, ev.LastTimestamp,
			ev.ReportingController, ev.ReportingInstance)
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

// The same event again is counted on the first one, as client-go's
// recorder does: a strategic merge patch of its count; once the first one
// is gone from the server (events expire), it is posted anew.
func TestKubeRecorderCountsRepeatedEvent(t *testing.T) {
	a := newFakeAPIServer(t)
	k := newTestKubeRecorder(t, a.config())
	pod := PodInfo{Name: "web-0", Namespace: "shop", UID: "u1"}
	k.PodEvent(context.Background(), pod, true, ReasonFetchFailed, "image x: not found")
	first := a.next(t)
	for want := 2; want <= 3; want++ {
		k.PodEvent(context.Background(), pod, true, ReasonFetchFailed, "image x: not found")
		p := a.nextPatch(t)
		if want := "/api/v1/namespaces/shop/events/" + first.Name; p.path != want {
			t.Errorf("PATCH %s, want %s", p.path, want)
		}
		if p.contentType != "application/strategic-merge-patch+json" {
			t.Errorf("PATCH of type %q", p.contentType)
		}
		var patch corev1.Event
		if err := json.Unmarshal(p.body, &patch); err != nil || int(patch.Count) != want || patch.LastTimestamp.IsZero() ||
			patch.Message != "image x: not found" {
			t.Errorf("patch %s (%v), want count %d", p.body, err, want)
		}
	}
	// Another message is another event.
	k.PodEvent(context.Background(), pod, true, ReasonFetchFailed, "image y: not found")
	if ev := a.next(t); ev.Message != "image y: not found" || ev.Count != 1 {
		t.Errorf("event %q count %d", ev.Message, ev.Count)
	}
	// The first one expired on the server.
	a.mu.Lock()
	a.patchTo = http.StatusNotFound
	a.mu.Unlock()
	k.PodEvent(context.Background(), pod, true, ReasonFetchFailed, "image x: not found")
	a.nextPatch(t)
	if ev := a.next(t); ev.Message != "image x: not found" || ev.Count != 1 || ev.Name == first.Name {
		t.Errorf("after the 404: event %q count %d name %q", ev.Message, ev.Count, ev.Name)
	}
}

// A pod gets a burst of events, then one per refill period; other pods
// are not held back by it. A transient failure is retried; the token file
// is read again for each request.
func TestKubeRecorderSpamFilterRetriesAndToken(t *testing.T) {
	a := newFakeAPIServer(t)
	cfg := a.config()
	cfg.Token, cfg.TokenFile = "", filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(cfg.TokenFile, []byte("tok\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	k := newTestKubeRecorder(t, cfg)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	k.now = func() time.Time { return now }
	pod := PodInfo{Name: "web-0", Namespace: "shop", UID: "u1"}
	for i := range eventBurst + 5 {
		k.PodEvent(context.Background(), pod, true, ReasonFetchFailed, fmt.Sprintf("failure %d", i))
	}
	k.PodEvent(context.Background(), PodInfo{Name: "other", Namespace: "shop"}, true, ReasonFetchFailed, "sentinel")
	posted := 0
	for ev := a.next(t); ev.InvolvedObject.Name != "other"; ev = a.next(t) {
		posted++
	}
	if posted != eventBurst {
		t.Errorf("%d events of one pod posted at once, want the burst of %d", posted, eventBurst)
	}
	// One refill period later, one more; the server fails twice first,
	// and the token has rotated.
	now = now.Add(eventRefill)
	a.mu.Lock()
	a.fail, a.token = 2, "tok2" // eventTries is 3
	a.mu.Unlock()
	if err := os.WriteFile(cfg.TokenFile, []byte("tok2"), 0o600); err != nil {
		t.Fatal(err)
	}
	k.PodEvent(context.Background(), pod, true, ReasonFetchFailed, "after the refill")
	k.PodEvent(context.Background(), pod, true, ReasonFetchFailed, "over the limit")
	k.PodEvent(context.Background(), PodInfo{Name: "other", Namespace: "shop"}, true, ReasonFetchFailed, "sentinel 2")
	if ev := a.next(t); ev.Message != "after the refill" {
		t.Errorf("posted %q, want the event after the refill", ev.Message)
	}
	if ev := a.next(t); ev.Message != "sentinel 2" {
		t.Errorf("posted %q, want the other pod's (the pod's second event is over its limit)", ev.Message)
	}
}

// PodEvent never waits for the API server: with the server stuck, events
// beyond the queue are dropped, and Close returns.
func TestKubeRecorderNeverBlocks(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(release) })
	k := newTestKubeRecorder(t, KubeConfig{Host: srv.URL})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 2*eventQueueLen + 10 {
			k.PodEvent(context.Background(), PodInfo{Name: fmt.Sprintf("p%d", i), Namespace: "ns"}, true, ReasonFetchFailed, "m")
		}
		k.Close()
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("PodEvent or Close waits for the API server")
	}
}

func TestInClusterConfig(t *testing.T) {
	dir := t.TempDir()
	withToken := filepath.Join(dir, "sa")
	if err := os.MkdirAll(withToken, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string]string{"token": "tok", "ca.crt": "PEM"} {
		if err := os.WriteFile(filepath.Join(withToken, name), []byte(b), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	noCA := filepath.Join(dir, "noca")
	if err := os.MkdirAll(noCA, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(noCA, "token"), []byte("tok"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, host, port, dir string
		wantHost              string
		notInCluster          bool
		wantErr               string
	}{
		{name: "no env", dir: withToken, notInCluster: true},
		{name: "no port", host: "10.0.0.1", dir: withToken, notInCluster: true},
		{name: "no token", host: "10.0.0.1", port: "443", dir: filepath.Join(dir, "none"), notInCluster: true},
		{name: "no CA", host: "10.0.0.1", port: "443", dir: noCA, wantErr: "CA"},
		{name: "IPv4", host: "10.0.0.1", port: "443", dir: withToken, wantHost: "https://10.0.0.1:443"},
		{name: "IPv6", host: "fd00::1", port: "6443", dir: withToken, wantHost: "https://[fd00::1]:6443"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg, err := inClusterConfig(c.host, c.port, c.dir)
			switch {
			case c.notInCluster:
				if !errors.Is(err, ErrNotInCluster) {
					t.Fatalf("got %v, want ErrNotInCluster", err)
				}
			case c.wantErr != "":
				if err == nil || errors.Is(err, ErrNotInCluster) || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("got %v, want an error about the %s", err, c.wantErr)
				}
			case err != nil:
				t.Fatal(err)
			case cfg.Host != c.wantHost || cfg.TokenFile != filepath.Join(c.dir, "token") || string(cfg.CAData) != "PEM":
				t.Errorf("config %+v", cfg)
			}
		})
	}
	if _, err := NewKubeRecorder(context.Background(), KubeConfig{Host: "10.0.0.1:443"}, "c", "n"); err == nil ||
		!strings.Contains(err.Error(), "API server URL") {
		t.Errorf("a host without scheme: %v", err)
	}
	if _, err := NewKubeRecorder(context.Background(), KubeConfig{Host: "https://h", CAData: []byte("x")}, "c", "n"); err == nil ||
		!strings.Contains(err.Error(), "CA") {
		t.Errorf("a CA without certificates: %v", err)
	}
}

// A final publish failure reaches the API server as a warning on the pod,
// and neither the secrets nor kubelet's service account token (a
// volume_context value) appear in what is posted.
func TestPodEventsToAPIServer(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	repo.publish(t, "app", sampleFiles(4))
	a := newFakeAPIServer(t)
	e := newTestEnv(t, Config{}, WithEventRecorder(newTestKubeRecorder(t, a.config())))
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
