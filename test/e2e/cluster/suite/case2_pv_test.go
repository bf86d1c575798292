package suite

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// staticPV creates a PersistentVolume of the driver for the image and a
// claim in ns bound to it by name (the controller-manager binds them). The
// PV's handle is unique; the content is named by the attributes.
func (e *env) staticPV(t *testing.T, ns, name string, attrs map[string]string) {
	t.Helper()
	ctx := context.Background()
	pvName := ns + "-" + name
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: pvName},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
			AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany},
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
			StorageClassName:              "",
			ClaimRef:                      &corev1.ObjectReference{Namespace: ns, Name: name},
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: e.driver, VolumeHandle: pvName, ReadOnly: true, VolumeAttributes: attrs}},
		},
	}
	if _, err := e.cs.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating PV: %v", err)
	}
	t.Cleanup(func() {
		_ = e.cs.CoreV1().PersistentVolumes().Delete(context.Background(), pvName, metav1.DeleteOptions{})
	})
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany},
			StorageClassName: ptr(""),
			VolumeName:       pvName,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
		},
	}
	if _, err := e.cs.CoreV1().PersistentVolumeClaims(ns).Create(ctx, pvc, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating PVC: %v", err)
	}
}

func (e *env) waitBound(t *testing.T, ns, name string) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < 2*time.Minute {
		c, err := e.cs.CoreV1().PersistentVolumeClaims(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err == nil && c.Status.Phase == corev1.ClaimBound {
			return time.Since(start)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("claim %s/%s not bound after 2m", ns, name)
	return 0
}

func pvcVolume(name, claim string) corev1.Volume {
	return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim, ReadOnly: true}}}
}

// Case 2: a static PV + PVC bound by the controller-manager, two pods
// sharing it, and one pod with two PVs of the same image.
func TestCase2StaticPV(t *testing.T) {
	e := setup(t)
	ns := e.newNamespace(t)
	r := e.repo.newRepo(t, true)
	tr := sampleTree(t, 2)
	digest := r.build(t, e, "pv.cfs", tr.dir)
	attrs := r.attrs("pv.cfs", digest)

	e.staticPV(t, ns, "shared", attrs)
	report(t, "claim shared bound in %s", e.waitBound(t, ns, "shared").Round(time.Millisecond))
	for _, name := range []string{"pv-a", "pv-b"} {
		e.createPod(t, ns, e.readerPod(name, pvcVolume("data", "shared")))
	}
	for _, name := range []string{"pv-a", "pv-b"} {
		_, took := e.waitRunning(t, ns, name, 2*time.Minute)
		files, _ := e.verifyTree(t, ns, name, "/data", tr)
		report(t, "pod %s on claim shared Running after %s, %d files verified", name, took.Round(time.Millisecond), files)
	}

	e.staticPV(t, ns, "one", attrs)
	e.staticPV(t, ns, "two", attrs)
	e.waitBound(t, ns, "one")
	e.waitBound(t, ns, "two")
	e.createPod(t, ns, e.readerPod("two-pvs", pvcVolume("one", "one"), pvcVolume("two", "two")))
	p, took := e.waitRunning(t, ns, "two-pvs", 2*time.Minute)
	for _, dir := range []string{"/one", "/two"} {
		e.verifyTree(t, ns, "two-pvs", dir, tr)
	}
	mounts := e.podMounts(t, string(p.UID))
	if len(mounts) != 2 {
		t.Errorf("pod with two PVs has %d composefs mounts on the node, want 2: %v", len(mounts), mounts)
	}
	report(t, "pod with two PVs of one image Running after %s, both verified, %d node mounts", took.Round(time.Millisecond), len(mounts))
	_ = fmt.Sprint()
}
