package suite

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Case 5: a wrong digest, a missing object, a source outside the
// allow-list, an unknown attribute: the pod stays ContainerCreating with
// an event on it that names the cause, nothing is left mounted, and the
// fixed spec (a new pod) works.
func TestCase5Failures(t *testing.T) {
	e := setup(t)
	ns := e.newNamespace(t)
	good := e.repo.newRepo(t, true)
	tr := sampleTree(t, 5)
	digest := good.build(t, e, "good.cfs", tr.dir)

	// An image one of whose objects the repository lacks.
	holed := e.repo.newRepo(t, true)
	htr := sampleTree(t, uint64(time.Now().UnixNano())) // content new to the node
	hdigest := holed.build(t, e, "holed.cfs", htr.dir)
	var removed, removedPath string
	for o, size := range holed.objectFiles(t) {
		if size == int64(len(htr.files["data/big.bin"])) {
			removed, removedPath = o, filepath.Join(holed.dir, "objects", filepath.FromSlash(o))
		}
	}
	hidden := removedPath + ".hidden"
	if err := os.Rename(removedPath, hidden); err != nil {
		t.Fatal(err)
	}

	outside := e.repo.newRepo(t, false)
	odigest := outside.build(t, e, "outside.cfs", tr.dir)

	withExtra := good.attrs("good.cfs", digest)
	withExtra["colour"] = "blue"
	wrong := strings.Repeat("ab", 32)

	cases := []struct {
		name  string
		attrs map[string]string
		cause []string // words the event must contain
		fix   func()
		fixed map[string]string
	}{
		{"wrong-digest", good.attrs("good.cfs", wrong), []string{"digest", wrong}, nil, good.attrs("good.cfs", digest)},
		{"missing-object", holed.attrs("holed.cfs", hdigest), []string{strings.Replace(removed, "/", "", 1)}, func() {
			if err := os.Rename(hidden, removedPath); err != nil {
				t.Fatal(err)
			}
		}, holed.attrs("holed.cfs", hdigest)},
		{"outside-allow-list", outside.attrs("outside.cfs", odigest), []string{"not allowed"}, nil, good.attrs("good.cfs", digest)},
		{"unknown-attribute", withExtra, []string{"colour"}, nil, good.attrs("good.cfs", digest)},
	}
	for _, c := range cases {
		e.createPod(t, ns, e.readerPod(c.name, e.inlineVolume("data", c.attrs)))
	}
	ctx := context.Background()
	for _, c := range cases {
		ev := e.waitEvent(t, ns, c.name, 90*time.Second, c.cause...)
		p, err := e.cs.CoreV1().Pods(ns).Get(ctx, c.name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if !containerCreating(p) {
			t.Errorf("%s: pod is %s, want ContainerCreating", c.name, phase(p, nil))
		}
		if m := e.podMounts(t, string(p.UID)); len(m) > 0 {
			t.Errorf("%s: mounted on the node although the volume failed: %v", c.name, m)
		}
		report(t, "%s: pod %s; event %s/%s from %s: %q; nothing mounted", c.name, phase(p, nil), ev.Type, ev.Reason, ev.Source.Component, ev.Message)
	}
	for _, c := range cases {
		if c.fix != nil {
			c.fix()
		}
		name := c.name + "-fixed"
		e.createPod(t, ns, e.readerPod(name, e.inlineVolume("data", c.fixed)))
	}
	for _, c := range cases {
		name := c.name + "-fixed"
		_, took := e.waitRunning(t, ns, name, 2*time.Minute)
		report(t, "%s: fixed spec Running after %s", c.name, took.Round(time.Millisecond))
	}
}

func containerCreating(p *corev1.Pod) bool {
	if p.Status.Phase != corev1.PodPending {
		return false
	}
	for _, c := range p.Status.ContainerStatuses {
		if c.State.Waiting == nil || c.State.Waiting.Reason != "ContainerCreating" {
			return false
		}
	}
	return true
}
