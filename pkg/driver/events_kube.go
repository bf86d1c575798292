package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"sync/atomic"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"
)

// ErrNotInCluster: no in-cluster API server configuration (no
// KUBERNETES_SERVICE_HOST/PORT or no service account token).
var ErrNotInCluster = rest.ErrNotInCluster

// maxEventMessage is the longest message posted; the API server limits
// event messages to 1 KiB in places, and longer ones say nothing more useful.
const maxEventMessage = 1024

// KubeRecorder posts core/v1 Events on pods with client-go's event recorder
// (tools/record) and the plugin's service account; RBAC needs `create` and
// `patch` on `events` (patch: repeated events are aggregated into one with
// a count). Events are queued and sent in the background (the broadcaster
// drops them when its queue is full), so a slow API server never slows a
// publish. Close shuts the broadcaster down.
type KubeRecorder struct {
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
	closeOnce   sync.Once
	closed      atomic.Bool
}

// NewInClusterRecorder makes a recorder from the in-cluster configuration,
// or returns an error wrapping ErrNotInCluster when there is none.
func NewInClusterRecorder(ctx context.Context, component, node string) (*KubeRecorder, error) {
	cfg, err := rest.InClusterConfig()
	switch {
	case errors.Is(err, rest.ErrNotInCluster):
		return nil, err
	case errors.Is(err, fs.ErrNotExist): // env set, but no service account mounted
		return nil, fmt.Errorf("%w: %v", ErrNotInCluster, err)
	case err != nil:
		return nil, fmt.Errorf("in-cluster config: %w", err)
	}
	return NewKubeRecorder(ctx, cfg, component, node)
}

// NewKubeRecorder makes a recorder that posts to the API server cfg points
// at. Events name component and node as their source.
func NewKubeRecorder(ctx context.Context, cfg *rest.Config, component, node string) (*KubeRecorder, error) {
	cfg = rest.CopyConfig(cfg)
	if cfg.UserAgent == "" {
		cfg.UserAgent = component
	}
	client, err := typedcorev1.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	b := record.NewBroadcaster(record.WithContext(ctx))
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.Events("")})
	return &KubeRecorder{
		broadcaster: b,
		recorder:    b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: component, Host: node}),
	}, nil
}

// PodEvent logs the event and queues it for the API server.
func (k *KubeRecorder) PodEvent(ctx context.Context, pod PodInfo, warning bool, reason, message string) {
	logRecorder{}.PodEvent(ctx, pod, warning, reason, message)
	if pod.Name == "" || pod.Namespace == "" || k.closed.Load() {
		return
	}
	typ := corev1.EventTypeNormal
	if warning {
		typ = corev1.EventTypeWarning
	}
	if len(message) > maxEventMessage {
		message = message[:maxEventMessage-3] + "..."
	}
	ref := &corev1.ObjectReference{APIVersion: "v1", Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: types.UID(pod.UID)}
	k.recorder.Eventf(ref, typ, reason, "%s", message)
}

// Close stops sending events; those still queued are dropped.
func (k *KubeRecorder) Close() {
	k.closed.Store(true)
	k.closeOnce.Do(k.broadcaster.Shutdown)
}

// closeEvents shuts down the driver's event recorder, if it has anything
// to shut down.
func (d *Driver) closeEvents() {
	if c, ok := d.events.(interface{ Close() }); ok {
		c.Close()
	}
}
