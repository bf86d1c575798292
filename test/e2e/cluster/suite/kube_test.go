package suite

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/remotecommand"
)

func ptr[T any](v T) *T { return &v }

// namespace creates a namespace for the case and deletes it (and waits)
// when the case ends.
func (e *env) newNamespace(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	ns, err := e.cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "e2e-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating namespace: %v", err)
	}
	name := ns.Name
	t.Cleanup(func() {
		e.deleteNamespace(t, name)
	})
	return name
}

func (e *env) deleteNamespace(t *testing.T, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// Pods first, so their volumes are unpublished while the driver runs.
	e.deleteAllPods(t, ctx, name)
	if err := e.cs.CoreV1().Namespaces().Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Errorf("deleting namespace %s: %v", name, err)
		return
	}
	for ctx.Err() == nil {
		if _, err := e.cs.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{}); apierrors.IsNotFound(err) {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Errorf("namespace %s still there after 3m", name)
}

func (e *env) deleteAllPods(t *testing.T, ctx context.Context, ns string) {
	l, err := e.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	for _, p := range l.Items {
		e.deletePod(t, ctx, ns, p.Name)
	}
	for _, p := range l.Items {
		if err := e.waitPodGone(ctx, ns, p.Name); err != nil {
			t.Errorf("pod %s/%s: %v", ns, p.Name, err)
		}
	}
}

func (e *env) deletePod(t *testing.T, ctx context.Context, ns, name string) {
	err := e.cs.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: ptr(int64(1))})
	if err != nil && !apierrors.IsNotFound(err) {
		t.Errorf("deleting pod %s/%s: %v", ns, name, err)
	}
}

func (e *env) waitPodGone(ctx context.Context, ns, name string) error {
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		if _, err := e.cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{}); apierrors.IsNotFound(err) {
			return nil
		}
		time.Sleep(300 * time.Millisecond)
	}
	return fmt.Errorf("still there 2m after deletion")
}

// inlineVolume is a CSI ephemeral inline volume of the driver.
func (e *env) inlineVolume(name string, attrs map[string]string) corev1.Volume {
	return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
		Driver: e.driver, ReadOnly: ptr(true), VolumeAttributes: attrs}}}
}

// attrs are a volume's attributes for image name in repository p.
func (p *repo) attrs(image, digest string) map[string]string {
	a := map[string]string{"repository": p.url, "image": image}
	if digest != "" {
		a["digest"] = digest
	}
	return a
}

// readerPod is a busybox pod that idles (and exits at once on SIGTERM)
// with the volumes mounted read-only at /<volume name>.
func (e *env) readerPod(name string, vols ...corev1.Volume) *corev1.Pod {
	var mounts []corev1.VolumeMount
	for _, v := range vols {
		mounts = append(mounts, corev1.VolumeMount{Name: v.Name, MountPath: "/" + v.Name, ReadOnly: true})
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"e2e": "reader"}},
		Spec: corev1.PodSpec{
			AutomountServiceAccountToken:  ptr(false),
			EnableServiceLinks:            ptr(false),
			TerminationGracePeriodSeconds: ptr(int64(1)),
			Containers: []corev1.Container{{
				Name: "reader", Image: e.busybox, ImagePullPolicy: corev1.PullIfNotPresent,
				Command:      []string{"/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"},
				VolumeMounts: mounts,
			}},
			Volumes: vols,
		},
	}
}

func (e *env) createPod(t *testing.T, ns string, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	out, err := e.cs.CoreV1().Pods(ns).Create(context.Background(), p, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s: %v", p.Name, err)
	}
	return out
}

// waitRunning waits until the pod runs with every container ready, and
// returns how long that took from the pod's creation.
func (e *env) waitRunning(t *testing.T, ns, name string, timeout time.Duration) (*corev1.Pod, time.Duration) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(timeout)
	var p *corev1.Pod
	var err error
	for time.Now().Before(deadline) {
		p, err = e.cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil && p.Status.Phase == corev1.PodRunning && allReady(p) {
			return p, time.Since(p.CreationTimestamp.Time)
		}
		if err == nil && (p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded) {
			t.Fatalf("pod %s/%s ended: %s", ns, name, p.Status.Phase)
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("pod %s/%s not running after %s: %v; events: %s", ns, name, timeout, phase(p, err), e.eventSummary(ns, name))
	return nil, 0
}

func allReady(p *corev1.Pod) bool {
	if len(p.Status.ContainerStatuses) == 0 {
		return false
	}
	for _, c := range p.Status.ContainerStatuses {
		if !c.Ready {
			return false
		}
	}
	return true
}

func phase(p *corev1.Pod, err error) string {
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	b.WriteString(string(p.Status.Phase))
	for _, c := range p.Status.ContainerStatuses {
		if c.State.Waiting != nil {
			fmt.Fprintf(&b, " %s waiting: %s", c.Name, c.State.Waiting.Reason)
		}
	}
	return b.String()
}

// podEvents are the events on a pod, oldest first.
func (e *env) podEvents(ns, name string) []corev1.Event {
	l, err := e.cs.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{
		FieldSelector: fields.AndSelectors(fields.OneTermEqualSelector("involvedObject.name", name),
			fields.OneTermEqualSelector("involvedObject.kind", "Pod")).String()})
	if err != nil {
		return nil
	}
	sort.Slice(l.Items, func(i, j int) bool { return l.Items[i].LastTimestamp.Before(&l.Items[j].LastTimestamp) })
	return l.Items
}

func (e *env) eventSummary(ns, name string) string {
	var parts []string
	for _, ev := range e.podEvents(ns, name) {
		parts = append(parts, fmt.Sprintf("[%s %s from %s: %s]", ev.Type, ev.Reason, ev.Source.Component, ev.Message))
	}
	return strings.Join(parts, " ")
}

// waitEvent waits for a Warning event on the pod whose message contains
// every one of want (case-insensitive) and returns it.
func (e *env) waitEvent(t *testing.T, ns, name string, timeout time.Duration, want ...string) corev1.Event {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		for _, ev := range e.podEvents(ns, name) {
			if ev.Type != corev1.EventTypeWarning {
				continue
			}
			msg := strings.ToLower(ev.Message)
			ok := true
			for _, w := range want {
				ok = ok && strings.Contains(msg, strings.ToLower(w))
			}
			if ok {
				return ev
			}
		}
		time.Sleep(time.Second)
	}
	t.Fatalf("pod %s/%s: no event naming %q within %s; events: %s", ns, name, want, timeout, e.eventSummary(ns, name))
	return corev1.Event{}
}

// exec runs cmd in the pod's first container and returns its output.
func (e *env) exec(ctx context.Context, ns, pod string, cmd ...string) (string, string, error) {
	req := e.cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Command: cmd, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	ex, err := newExecutor(e, req.URL())
	if err != nil {
		return "", "", err
	}
	var stdout, stderr bytes.Buffer
	err = ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr})
	return stdout.String(), stderr.String(), err
}

func newExecutor(e *env, u *url.URL) (remotecommand.Executor, error) {
	ws, err := remotecommand.NewWebSocketExecutor(e.cfg, "GET", u.String())
	if err != nil {
		return nil, err
	}
	spdy, err := remotecommand.NewSPDYExecutor(e.cfg, "POST", u)
	if err != nil {
		return nil, err
	}
	return remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool { return true })
}

// mustExec runs a shell script in the pod and fails the case on error.
func (e *env) mustExec(t *testing.T, ns, pod, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, errOut, err := e.exec(ctx, ns, pod, "/bin/sh", "-c", script)
	if err != nil {
		t.Fatalf("exec in %s/%s %q: %v\nstdout: %s\nstderr: %s", ns, pod, script, err, out, errOut)
	}
	return out
}
