package suite

import (
	"archive/tar"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestBenchStartup is the startup benchmark (bench/README.md), run by hand
// with E2E_BENCH=1: the time from creating a pod to Running with a
// composefs volume of ~200 MiB in ~2,000 files, cold (nothing on the node)
// and warm (image and objects present), against the same content as an
// emptyDir filled by an init container that downloads and extracts a
// tarball of it from the same server. One run; ratios against the
// emptyDir baseline measured in the same run.
func TestBenchStartup(t *testing.T) {
	if os.Getenv("E2E_BENCH") == "" {
		t.Skip("the startup benchmark runs with E2E_BENCH=1 (make bench-e2e)")
	}
	e := setup(t)
	ns := e.newNamespace(t)
	r := e.repo.newRepo(t, true)
	const files, size = 2000, 100 << 10
	seed := uint64(time.Now().UnixNano())
	tr := newTree(t)
	for i := 0; i < files; i++ {
		tr.add(t, fmt.Sprintf("d%02d/f%04d.bin", i%40, i), randomBytes(seed+uint64(i), size+i%4096))
	}
	digest := r.build(t, e, "bench.cfs", tr.dir)
	writeTar(t, tr, filepath.Join(r.dir, "tree.tar"))
	report(t, "content: %d files, %.1f MiB", len(tr.files), float64(tr.bytes())/(1<<20))

	cold := e.timeToRunning(t, ns, e.readerPod("cold", e.inlineVolume("data", r.attrs("bench.cfs", digest))))
	e.verifyTree(t, ns, "cold", "/data", tr)
	ctx := context.Background()
	e.deletePod(t, ctx, ns, "cold")
	if err := e.waitPodGone(ctx, ns, "cold"); err != nil {
		t.Fatal(err)
	}
	warm := e.timeToRunning(t, ns, e.readerPod("warm", e.inlineVolume("data", r.attrs("bench.cfs", digest))))

	p := e.readerPod("emptydir", corev1.Volume{Name: "data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
	p.Spec.HostNetwork = true // the server is on the node's loopback
	p.Spec.Containers[0].VolumeMounts[0].ReadOnly = false
	p.Spec.InitContainers = []corev1.Container{{
		Name: "fill", Image: e.busybox, ImagePullPolicy: corev1.PullIfNotPresent,
		Command:      []string{"/bin/sh", "-c", fmt.Sprintf("wget -q -O - %s/tree.tar | tar -x -f - -C /data", r.url)},
		VolumeMounts: []corev1.VolumeMount{{Name: "data", MountPath: "/data"}},
	}}
	empty := e.timeToRunning(t, ns, p)
	e.verifyTree(t, ns, "emptydir", "/data", tr)

	report(t, "apply -> Running: cold %.2f s, warm %.2f s, emptyDir+tarball %.2f s", cold.Seconds(), warm.Seconds(), empty.Seconds())
	report(t, "ratios against emptyDir+tarball: cold %.2f, warm %.2f", cold.Seconds()/empty.Seconds(), warm.Seconds()/empty.Seconds())
}

// timeToRunning creates the pod and measures, on this clock, until the
// API shows it Running with its containers ready.
func (e *env) timeToRunning(t *testing.T, ns string, p *corev1.Pod) time.Duration {
	t.Helper()
	ctx := context.Background()
	start := time.Now()
	if _, err := e.cs.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for time.Since(start) < 10*time.Minute {
		got, err := e.cs.CoreV1().Pods(ns).Get(ctx, p.Name, metav1.GetOptions{})
		if err == nil && got.Status.Phase == corev1.PodRunning && allReady(got) {
			return time.Since(start)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("pod %s not running after 10m: %s", p.Name, e.eventSummary(ns, p.Name))
	return 0
}

func writeTar(t *testing.T, tr *tree, out string) {
	t.Helper()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	names := make([]string, 0, len(tr.files))
	for n := range tr.files {
		names = append(names, n)
	}
	sort.Strings(names)
	dirs := map[string]bool{}
	for _, name := range names {
		if d := filepath.Dir(name); d != "." && !dirs[d] {
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Name: d + "/", Mode: 0o755, Typeflag: tar.TypeDir}); err != nil {
				t.Fatal(err)
			}
		}
		data := tr.files[name]
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}
