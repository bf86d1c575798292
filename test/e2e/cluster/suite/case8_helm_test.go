package suite

import (
	"context"
	"fmt"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Case 8: helm upgrade with a changed value rolls the DaemonSet while
// mounted volumes keep serving; helm uninstall leaves the mounts of
// still-running pods alone; installing again lets those pods go cleanly.
func TestCase8HelmUpgradeUninstall(t *testing.T) {
	e := setup(t)
	ctx := context.Background()
	rel := e.helmRelease()
	vals, err := rel.Values()
	if err != nil {
		t.Fatalf("helm get values: %v", err)
	}
	ns := e.newNamespace(t)
	r := e.repo.newRepo(t, true)
	tr := sampleTree(t, 8)
	digest := r.build(t, e, "helm.cfs", tr.dir)
	e.createPod(t, ns, e.readerPod("keeps", e.inlineVolume("data", r.attrs("helm.cfs", digest))))
	pod, _ := e.waitRunning(t, ns, "keeps", 2*time.Minute)

	old, err := e.pluginPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ds, _ := e.daemonSet(ctx)
	t0 := time.Now()
	e.helmUpgrade(t, valLogLevel+"=5")
	nds, _ := e.daemonSet(ctx)
	cur, err := e.pluginPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if cur.UID == old.UID || nds.Generation == ds.Generation {
		t.Errorf("helm upgrade did not roll the DaemonSet: generation %d -> %d, pod %s -> %s", ds.Generation, nds.Generation, old.Name, cur.Name)
	}
	e.verifyTree(t, ns, "keeps", "/data", tr)
	report(t, "helm upgrade --set %s=5 rolled the DaemonSet (generation %d -> %d, pod %s -> %s) in %s; the mounted volume still reads right",
		valLogLevel, ds.Generation, nds.Generation, old.Name, cur.Name, time.Since(t0).Round(100*time.Millisecond))

	// Install back whatever happens below, so that later cases and the
	// cluster's teardown find the driver.
	reinstalled := false
	reinstall := func() {
		if reinstalled {
			return
		}
		reinstalled = true
		if err := rel.Install(ctx, e.chart, vals); err != nil {
			t.Fatalf("helm install again: %v", err)
		}
		if err := e.waitDaemonSetReady(ctx, 0); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(reinstall)
	t0 = time.Now()
	if err := rel.Uninstall(); err != nil {
		t.Fatal(err)
	}
	for {
		_, err := e.cs.StorageV1().CSIDrivers().Get(ctx, e.driver, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			break
		}
		if time.Since(t0) > 2*time.Minute {
			t.Fatalf("CSIDriver %s still there 2m after helm uninstall", e.driver)
		}
		time.Sleep(500 * time.Millisecond)
	}
	mounts := e.podMounts(t, string(pod.UID))
	if len(mounts) != 1 {
		t.Errorf("after helm uninstall the running pod has %d composefs mounts on the node, want its 1: %v", len(mounts), mounts)
	}
	e.verifyTree(t, ns, "keeps", "/data", tr)
	report(t, "helm uninstall took %s; the running pod's mount stays (%d on the node) and still reads right", time.Since(t0).Round(100*time.Millisecond), len(mounts))

	t0 = time.Now()
	reinstall()
	e.deletePod(t, ctx, ns, "keeps")
	if err := e.waitPodGone(ctx, ns, "keeps"); err != nil {
		t.Fatal(err)
	}
	if m := e.podMounts(t, string(pod.UID)); len(m) > 0 {
		t.Errorf("mounts left after the pod was deleted: %v", m)
	}
	report(t, "installed again and the pod deleted in %s: its mount is gone", time.Since(t0).Round(100*time.Millisecond))
	_ = fmt.Sprint()
}
