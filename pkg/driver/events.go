package driver

import (
	"context"
	"errors"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// Event reasons.
const (
	ReasonFetchFailed        = "FetchFailed"
	ReasonVerificationFailed = "VerificationFailed"
	// ReasonSignatureRejected: the trust policy refused the image
	// (unsigned where a signature is required, an unknown key, or a
	// signature that does not verify).
	ReasonSignatureRejected = "SignatureRejected"
)

// EventRecorder reports what happened to a pod's volume where its owner
// sees it. A Kubernetes implementation posts events on the pod named by
// podInfoOnMount; the default only logs them.
type EventRecorder interface {
	PodEvent(ctx context.Context, pod PodInfo, warning bool, reason, message string)
}

// WithEventRecorder sets where pod events go. The driver owns r: when r
// has a Close method, Driver.Close calls it.
func WithEventRecorder(r EventRecorder) Option { return func(d *Driver) { d.events = r } }

// logRecorder writes pod events to the log.
type logRecorder struct{}

func (logRecorder) PodEvent(ctx context.Context, pod PodInfo, warning bool, reason, message string) {
	typ := "Normal"
	if warning {
		typ = "Warning"
	}
	klog.FromContext(ctx).Info("Pod event", "pod", klog.KRef(pod.Namespace, pod.Name), "type", typ, "reason", reason, "message", message)
}

// reportFailure tells the pod why its volume could not be published, when
// the failure is final (a retry cannot succeed without a change).
func (d *Driver) reportFailure(ctx context.Context, pod PodInfo, err error) {
	if pod.Name == "" || err == nil || !isFinal(errorCode(err)) {
		return
	}
	reason := ReasonFetchFailed
	switch {
	case isVerdict(err):
		reason = ReasonSignatureRejected
	case errors.Is(err, fetch.ErrDigestMismatch) || errors.Is(err, cfs.ErrImageDigestMismatch):
		reason = ReasonVerificationFailed
	}
	d.events.PodEvent(ctx, pod, true, reason, err.Error())
}
