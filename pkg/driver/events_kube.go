package driver

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
)

// Pod events are posted to the API server by this file's small client of
// one resource (core/v1 events: create, and a patch of the count for a
// repeated event), not by client-go's event recorder. Linking client-go's
// clientset, scheme and recorder made every process of the one binary
// start at 35 MiB resident instead of 22 (the node plugin, and each `pull`,
// whose goal is 64 MiB), and doubled the binary (67 MB to 34 MB): bench/README.md,
// "Start-up memory". What the recorder does that matters here is kept:
// a bounded queue that never blocks a publish, the same event again within
// ten minutes counted on the first one (a patch), a per-pod spam filter,
// and retries of transient failures.

// ErrNotInCluster: no in-cluster API server configuration (no
// KUBERNETES_SERVICE_HOST/PORT or no service account token).
var ErrNotInCluster = errors.New("no in-cluster configuration of the API server")

const (
	// maxEventMessage is the longest message posted; the API server
	// limits event messages to 1 KiB in places, and longer ones say
	// nothing more useful.
	maxEventMessage = 1024
	// eventQueueLen events wait to be sent; more are dropped (and logged).
	eventQueueLen = 256
	// eventAggregateWindow: the same event (pod, type, reason, message)
	// again within it raises the first one's count instead of making a
	// new object, as client-go's recorder does.
	eventAggregateWindow = 10 * time.Minute
	// maxSeenEvents bounds what the aggregation remembers.
	maxSeenEvents = 4096
	// The spam filter, per pod (client-go's numbers): a burst of
	// eventBurst, then one event per eventRefill.
	eventBurst  = 25
	eventRefill = 5 * time.Minute
	// eventTries of one request when it fails transiently (no answer,
	// 429, 5xx), eventRetryWait (with jitter) apart.
	eventTries     = 3
	eventRetryWait = 2 * time.Second
	// eventRequestTimeout bounds one request.
	eventRequestTimeout = 15 * time.Second
)

// serviceAccountDir holds the mounted service account's token and CA.
const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// KubeConfig says where and how events are posted.
type KubeConfig struct {
	// Host is the API server's URL (https://HOST:PORT).
	Host string
	// CAData is the PEM bundle the server's certificate must chain to
	// (none: the system's roots).
	CAData []byte
	// Token is a bearer token; TokenFile a file holding one, read again
	// for each request (projected service account tokens rotate).
	Token     string
	TokenFile string
	// UserAgent of the requests (default: the event source's component).
	UserAgent string
}

// InClusterConfig is the configuration of a pod: the API server from
// KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT, the mounted service
// account's token and CA. It fails with ErrNotInCluster when either is
// missing.
func InClusterConfig() (KubeConfig, error) {
	return inClusterConfig(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"), serviceAccountDir)
}

func inClusterConfig(host, port, dir string) (KubeConfig, error) {
	if host == "" || port == "" {
		return KubeConfig{}, fmt.Errorf("%w: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set", ErrNotInCluster)
	}
	token := filepath.Join(dir, "token")
	if _, err := os.Stat(token); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return KubeConfig{}, fmt.Errorf("%w: no service account token: %v", ErrNotInCluster, err)
		}
		return KubeConfig{}, fmt.Errorf("in-cluster config: %w", err)
	}
	ca, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return KubeConfig{}, fmt.Errorf("in-cluster config: reading the API server's CA: %w", err)
	}
	return KubeConfig{Host: "https://" + net.JoinHostPort(host, port), CAData: ca, TokenFile: token}, nil
}

// KubeRecorder posts core/v1 Events on pods with the plugin's service
// account; RBAC needs `create` and `patch` on `events` (patch: a repeated
// event is counted on the first one). Events are queued and sent by one
// goroutine (dropped when the queue is full), so a slow API server never
// slows a publish. Close stops it; events still queued are dropped.
type KubeRecorder struct {
	cfg    KubeConfig
	base   *url.URL
	client *http.Client
	source eventSource
	log    klog.Logger
	now    func() time.Time
	// retryWait is eventRetryWait (shorter in tests).
	retryWait time.Duration

	queue     chan kubeEvent
	cancel    context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
	closed    atomic.Bool

	// Only the sending goroutine uses these.
	seen    map[eventKey]*seenEvent
	buckets map[string]*eventBucket
}

// NewInClusterRecorder makes a recorder from the in-cluster configuration,
// or returns an error wrapping ErrNotInCluster when there is none.
func NewInClusterRecorder(ctx context.Context, component, node string) (*KubeRecorder, error) {
	cfg, err := InClusterConfig()
	if err != nil {
		return nil, err
	}
	return NewKubeRecorder(ctx, cfg, component, node)
}

// NewKubeRecorder makes a recorder that posts to the API server cfg points
// at, until ctx ends or Close. Events name component and node as their
// source.
func NewKubeRecorder(ctx context.Context, cfg KubeConfig, component, node string) (*KubeRecorder, error) {
	base, err := url.Parse(cfg.Host)
	if err != nil || base.Scheme != "https" && base.Scheme != "http" || base.Host == "" {
		return nil, fmt.Errorf("kubernetes client: API server URL %q: want http(s)://HOST[:PORT]", cfg.Host)
	}
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if len(cfg.CAData) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(cfg.CAData) {
			return nil, errors.New("kubernetes client: the API server's CA holds no PEM certificate")
		}
		tlsCfg.RootCAs = pool
	}
	if cfg.UserAgent == "" {
		cfg.UserAgent = component
	}
	tr := &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		TLSClientConfig:     tlsCfg,
		TLSHandshakeTimeout: 10 * time.Second,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     90 * time.Second,
		ForceAttemptHTTP2:   true,
	}
	ctx, cancel := context.WithCancel(ctx)
	k := &KubeRecorder{
		cfg:       cfg,
		base:      base,
		client:    &http.Client{Transport: tr, Timeout: eventRequestTimeout},
		source:    eventSource{Component: component, Host: node},
		log:       klog.FromContext(ctx),
		now:       time.Now,
		retryWait: eventRetryWait,
		queue:     make(chan kubeEvent, eventQueueLen),
		cancel:    cancel,
		done:      make(chan struct{}),
		seen:      make(map[eventKey]*seenEvent),
		buckets:   make(map[string]*eventBucket),
	}
	go k.run(ctx)
	return k, nil
}

// PodEvent logs the event and queues it for the API server.
func (k *KubeRecorder) PodEvent(ctx context.Context, pod PodInfo, warning bool, reason, message string) {
	logRecorder{}.PodEvent(ctx, pod, warning, reason, message)
	if pod.Name == "" || pod.Namespace == "" || k.closed.Load() {
		return
	}
	typ := "Normal"
	if warning {
		typ = "Warning"
	}
	if len(message) > maxEventMessage {
		message = message[:maxEventMessage-3] + "..."
	}
	t := k.now()
	e := kubeEvent{
		APIVersion:         "v1",
		Kind:               "Event",
		Metadata:           eventMeta{Name: fmt.Sprintf("%s.%x", pod.Name, t.UnixNano()), Namespace: pod.Namespace},
		InvolvedObject:     objectReference{APIVersion: "v1", Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID},
		Reason:             reason,
		Message:            message,
		Source:             k.source,
		FirstTimestamp:     kubeTime(t),
		LastTimestamp:      kubeTime(t),
		Count:              1,
		Type:               typ,
		ReportingComponent: k.source.Component,
		ReportingInstance:  k.source.Host,
	}
	select {
	case k.queue <- e:
	default:
		klog.FromContext(ctx).V(2).Info("Pod event dropped: the queue to the API server is full", "pod", klog.KRef(pod.Namespace, pod.Name), "reason", reason)
	}
}

// Close stops sending events; those still queued are dropped.
func (k *KubeRecorder) Close() {
	k.closed.Store(true)
	k.closeOnce.Do(func() {
		k.cancel()
		<-k.done
	})
}

// closeEvents shuts down the driver's event recorder, if it has anything
// to shut down.
func (d *Driver) closeEvents() {
	if c, ok := d.events.(interface{ Close() }); ok {
		c.Close()
	}
}

func (k *KubeRecorder) run(ctx context.Context) {
	defer close(k.done)
	defer k.client.CloseIdleConnections()
	for {
		select {
		case <-ctx.Done():
			return
		case e := <-k.queue:
			k.send(ctx, e)
		}
	}
}

// eventKey is what makes two events the same event.
type eventKey struct {
	namespace, name, uid, typ, reason, message string
}

// seenEvent is an event the API server has, with the count it was given.
type seenEvent struct {
	name  string
	count int32
	last  time.Time
}

// eventBucket is one pod's token bucket.
type eventBucket struct {
	tokens float64
	at     time.Time
}

// allow takes a token of the pod's bucket.
func (k *KubeRecorder) allow(pod string, now time.Time) bool {
	b, ok := k.buckets[pod]
	if !ok {
		if len(k.buckets) >= maxSeenEvents {
			for p, old := range k.buckets {
				if now.Sub(old.at) >= eventBurst*eventRefill {
					delete(k.buckets, p)
				}
			}
		}
		b = &eventBucket{tokens: eventBurst, at: now}
		k.buckets[pod] = b
	}
	b.tokens = min(eventBurst, b.tokens+float64(now.Sub(b.at))/float64(eventRefill))
	b.at = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// send posts e, or raises the count of the same event posted within the
// aggregation window.
func (k *KubeRecorder) send(ctx context.Context, e kubeEvent) {
	o := e.InvolvedObject
	now := time.Time(e.LastTimestamp)
	log := k.log.WithValues("pod", klog.KRef(o.Namespace, o.Name), "reason", e.Reason)
	if !k.allow(o.Namespace+"/"+o.Name+"/"+o.UID, now) {
		log.V(2).Info("Pod event dropped: too many events on this pod")
		return
	}
	key := eventKey{o.Namespace, o.Name, o.UID, e.Type, e.Reason, e.Message}
	if s, ok := k.seen[key]; ok && now.Sub(s.last) < eventAggregateWindow {
		patch, _ := json.Marshal(struct {
			Count         int32    `json:"count"`
			LastTimestamp kubeTime `json:"lastTimestamp"`
			Message       string   `json:"message"`
		}{s.count + 1, e.LastTimestamp, e.Message})
		err := k.request(ctx, http.MethodPatch, o.Namespace, s.name, "application/strategic-merge-patch+json", patch)
		if err == nil {
			s.count++
			s.last = now
			return
		}
		var se *apiStatusError
		if !errors.As(err, &se) || se.code != http.StatusNotFound {
			log.Error(err, "Counting a repeated pod event failed")
			return
		}
		// The first one expired on the server: post this one anew.
	}
	body, _ := json.Marshal(e)
	if err := k.request(ctx, http.MethodPost, o.Namespace, "", "application/json", body); err != nil {
		if ctx.Err() == nil {
			log.Error(err, "Posting a pod event failed")
		}
		return
	}
	if len(k.seen) >= maxSeenEvents {
		for key, s := range k.seen {
			if now.Sub(s.last) >= eventAggregateWindow {
				delete(k.seen, key)
			}
		}
		if len(k.seen) >= maxSeenEvents {
			clear(k.seen)
		}
	}
	k.seen[key] = &seenEvent{name: e.Metadata.Name, count: 1, last: now}
}

// apiStatusError is an answer of the API server other than 2xx.
type apiStatusError struct {
	method, path string
	code         int
	message      string
}

func (e *apiStatusError) Error() string {
	return fmt.Sprintf("%s %s: %d %s: %s", e.method, e.path, e.code, http.StatusText(e.code), e.message)
}

// transient reports whether a retry may succeed.
func (e *apiStatusError) transient() bool {
	return e.code == http.StatusTooManyRequests || e.code >= 500
}

// request sends one request about the namespace's events (name: one of
// them), retrying transient failures.
func (k *KubeRecorder) request(ctx context.Context, method, namespace, name, contentType string, body []byte) error {
	p := "/api/v1/namespaces/" + url.PathEscape(namespace) + "/events"
	if name != "" {
		p += "/" + url.PathEscape(name)
	}
	var err error
	for try := 1; ; try++ {
		if err = k.requestOnce(ctx, method, p, contentType, body); err == nil {
			return nil
		}
		var se *apiStatusError
		if errors.As(err, &se) && !se.transient() || try == eventTries || ctx.Err() != nil {
			return err
		}
		wait := k.retryWait + rand.N(k.retryWait/2+1)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
	}
}

func (k *KubeRecorder) requestOnce(ctx context.Context, method, p, contentType string, body []byte) error {
	u := *k.base
	u.Path = strings.TrimSuffix(u.Path, "/") + p
	req, err := http.NewRequestWithContext(ctx, method, u.String(), bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", contentType)
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", k.cfg.UserAgent)
	token := k.cfg.Token
	if k.cfg.TokenFile != "" {
		b, err := os.ReadFile(k.cfg.TokenFile)
		if err != nil {
			return fmt.Errorf("reading the service account token: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := k.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	if resp.StatusCode/100 == 2 {
		return nil
	}
	var status struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(msg, &status) != nil || status.Message == "" {
		status.Message = strings.TrimSpace(string(msg))
	}
	return &apiStatusError{method: method, path: p, code: resp.StatusCode, message: status.Message}
}

// kubeEvent is a core/v1 Event, with the fields this plugin sets.
type kubeEvent struct {
	APIVersion         string          `json:"apiVersion"`
	Kind               string          `json:"kind"`
	Metadata           eventMeta       `json:"metadata"`
	InvolvedObject     objectReference `json:"involvedObject"`
	Reason             string          `json:"reason"`
	Message            string          `json:"message"`
	Source             eventSource     `json:"source"`
	FirstTimestamp     kubeTime        `json:"firstTimestamp"`
	LastTimestamp      kubeTime        `json:"lastTimestamp"`
	Count              int32           `json:"count"`
	Type               string          `json:"type"`
	ReportingComponent string          `json:"reportingComponent"`
	ReportingInstance  string          `json:"reportingInstance"`
}

type eventMeta struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
}

type objectReference struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Namespace  string `json:"namespace"`
	Name       string `json:"name"`
	UID        string `json:"uid,omitempty"`
}

type eventSource struct {
	Component string `json:"component,omitempty"`
	Host      string `json:"host,omitempty"`
}

// kubeTime marshals as the API's timestamps do (RFC 3339, UTC, seconds).
type kubeTime time.Time

func (t kubeTime) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Time(t).UTC().Truncate(time.Second).Format(time.RFC3339))
}
