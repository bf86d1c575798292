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
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"k8s.io/klog/v2"
)

// In-cluster service account files and environment.
const (
	saTokenFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	saCAFile    = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
)

// ErrNotInCluster: no in-cluster API server configuration.
var ErrNotInCluster = errors.New("not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST or service account)")

// KubeRecorder posts core/v1 Events on pods through the API server with
// the plugin's service account (RBAC: create events). It is the plain
// REST call client-go's recorder makes, without client-go's weight. Events
// are sent in the background, at most maxInFlight at a time; beyond that
// they are logged and dropped so that a slow API server never slows a
// publish.
type KubeRecorder struct {
	base      string // https://host:port
	client    *http.Client
	tokenFile string
	component string
	host      string
	sem       chan struct{}
	now       func() time.Time
}

const maxEventsInFlight = 8

// NewInClusterRecorder makes a recorder from the in-cluster configuration,
// or returns ErrNotInCluster.
func NewInClusterRecorder(component, node string) (*KubeRecorder, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, ErrNotInCluster
	}
	if _, err := os.Stat(saTokenFile); err != nil {
		return nil, ErrNotInCluster
	}
	ca, err := os.ReadFile(saCAFile)
	if err != nil {
		return nil, fmt.Errorf("in-cluster events: %w", err)
	}
	return newKubeRecorder("https://"+net.JoinHostPort(host, port), ca, saTokenFile, component, node)
}

func newKubeRecorder(base string, ca []byte, tokenFile, component, node string) (*KubeRecorder, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, errors.New("in-cluster events: no certificate in the service account CA")
	}
	return &KubeRecorder{
		base: base,
		client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
			MaxIdleConns:    2, IdleConnTimeout: 90 * time.Second,
		}},
		tokenFile: tokenFile, component: component, host: node,
		sem: make(chan struct{}, maxEventsInFlight), now: time.Now,
	}, nil
}

type objectRef struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Namespace  string `json:"namespace"`
	Name       string `json:"name"`
	UID        string `json:"uid,omitempty"`
}

type coreEvent struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		GenerateName string `json:"generateName"`
		Namespace    string `json:"namespace"`
	} `json:"metadata"`
	InvolvedObject objectRef `json:"involvedObject"`
	Reason         string    `json:"reason"`
	Message        string    `json:"message"`
	Type           string    `json:"type"`
	Source         struct {
		Component string `json:"component"`
		Host      string `json:"host,omitempty"`
	} `json:"source"`
	FirstTimestamp string `json:"firstTimestamp"`
	LastTimestamp  string `json:"lastTimestamp"`
	Count          int    `json:"count"`
}

// PodEvent posts the event in the background (logging it too).
func (k *KubeRecorder) PodEvent(ctx context.Context, pod PodInfo, warning bool, reason, message string) {
	logRecorder{}.PodEvent(ctx, pod, warning, reason, message)
	if pod.Name == "" || pod.Namespace == "" {
		return
	}
	select {
	case k.sem <- struct{}{}:
	default:
		klog.FromContext(ctx).V(2).Info("Dropping pod event: too many in flight", "pod", klog.KRef(pod.Namespace, pod.Name), "reason", reason)
		return
	}
	log := klog.FromContext(ctx)
	go func() {
		defer func() { <-k.sem }()
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := k.post(sctx, pod, warning, reason, message); err != nil {
			log.Error(err, "Posting pod event", "pod", klog.KRef(pod.Namespace, pod.Name), "reason", reason)
		}
	}()
}

func (k *KubeRecorder) post(ctx context.Context, pod PodInfo, warning bool, reason, message string) error {
	var ev coreEvent
	ev.APIVersion, ev.Kind = "v1", "Event"
	ev.Metadata.GenerateName = pod.Name + "."
	ev.Metadata.Namespace = pod.Namespace
	ev.InvolvedObject = objectRef{APIVersion: "v1", Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID}
	ev.Reason = reason
	if len(message) > 1024 {
		message = message[:1021] + "..."
	}
	ev.Message = message
	ev.Type = "Normal"
	if warning {
		ev.Type = "Warning"
	}
	ev.Source.Component, ev.Source.Host = k.component, k.host
	ts := k.now().UTC().Format(time.RFC3339)
	ev.FirstTimestamp, ev.LastTimestamp, ev.Count = ts, ts, 1
	body, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	token, err := os.ReadFile(k.tokenFile) // re-read: projected tokens rotate
	if err != nil {
		return fmt.Errorf("reading the service account token: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, k.base+"/api/v1/namespaces/"+pod.Namespace+"/events", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	resp, err := k.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("API server answered %s: %s", resp.Status, strings.TrimSpace(string(msg)))
	}
	return nil
}
