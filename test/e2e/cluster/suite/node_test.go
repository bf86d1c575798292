package suite

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The node probe is a privileged busybox pod on the host's PID namespace
// with the driver's store mounted read-only: the suite reads the node's
// mountinfo, /proc/meminfo and store through it, on any cluster.
const probeNamespace, probeName = "e2e-node-probe", "probe"

var probeOnce sync.Once

func (e *env) probe(t *testing.T) {
	t.Helper()
	var err error
	probeOnce.Do(func() { err = e.startProbe() })
	if err != nil {
		t.Fatalf("node probe: %v", err)
	}
}

func (e *env) startProbe() error {
	ctx := context.Background()
	if _, err := e.cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: probeNamespace}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: probeName},
		Spec: corev1.PodSpec{
			NodeName:                      e.node,
			HostPID:                       true,
			AutomountServiceAccountToken:  ptr(false),
			EnableServiceLinks:            ptr(false),
			TerminationGracePeriodSeconds: ptr(int64(1)),
			Tolerations:                   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
			Containers: []corev1.Container{{
				Name: "probe", Image: e.busybox, ImagePullPolicy: corev1.PullIfNotPresent,
				Command:         []string{"/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"},
				SecurityContext: &corev1.SecurityContext{Privileged: ptr(true)},
				VolumeMounts:    []corev1.VolumeMount{{Name: "store", MountPath: "/store", ReadOnly: true}},
			}},
			Volumes: []corev1.Volume{{Name: "store", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: e.storeDir}}}},
		},
	}
	if _, err := e.cs.CoreV1().Pods(probeNamespace).Create(ctx, p, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		p, err := e.cs.CoreV1().Pods(probeNamespace).Get(ctx, probeName, metav1.GetOptions{})
		if err == nil && p.Status.Phase == corev1.PodRunning && allReady(p) {
			return nil
		}
		time.Sleep(300 * time.Millisecond)
	}
	return fmt.Errorf("probe pod not running after 2m: %s", e.eventSummary(probeNamespace, probeName))
}

func (e *env) stopProbe() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_ = e.cs.CoreV1().Namespaces().Delete(ctx, probeNamespace, metav1.DeleteOptions{})
}

// nodeShell runs a shell script on the node (in the probe).
func (e *env) nodeShell(t *testing.T, script string) string {
	t.Helper()
	e.probe(t)
	return e.mustExec(t, probeNamespace, probeName, script)
}

// storeObjects lists the store's object files (relative to objects/) and
// their sizes.
func (e *env) storeObjects(t *testing.T) map[string]int64 {
	t.Helper()
	out := e.nodeShell(t, `cd /store/objects 2>/dev/null && find . -type f -exec stat -c '%s %n' {} + || true`)
	objs := map[string]int64{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) != 2 {
			continue
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		objs[strings.TrimPrefix(f[1], "./")] = n
	}
	return objs
}

// storeKiB is the store's disk use (du -sk).
func (e *env) storeKiB(t *testing.T) int64 {
	t.Helper()
	f := strings.Fields(e.nodeShell(t, `du -sk /store`))
	if len(f) == 0 {
		t.Fatal("du printed nothing")
	}
	n, _ := strconv.ParseInt(f[0], 10, 64)
	return n
}

// podMounts are the node's mount points (init's mount namespace) under a
// pod's folder (any pod when uid is empty) that are composefs volumes:
// overlay or erofs mounts of CSI volumes.
func (e *env) podMounts(t *testing.T, uid string) []string {
	t.Helper()
	var mps []string
	for _, m := range e.podMountInfo(t, uid) {
		mps = append(mps, m.point)
	}
	return mps
}

// nodeMount is one line of the node's mountinfo.
type nodeMount struct {
	point, opts, fstype string
}

// podMountInfo is podMounts with each mount's per-mount options.
func (e *env) podMountInfo(t *testing.T, uid string) []nodeMount {
	t.Helper()
	out := e.nodeShell(t, `cat /proc/1/mountinfo`)
	var mps []nodeMount
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) < 10 {
			continue
		}
		mp, fstype := f[4], ""
		for i, x := range f {
			if x == "-" && i+1 < len(f) {
				fstype = f[i+1]
			}
		}
		if fstype != "overlay" && fstype != "erofs" {
			continue
		}
		if !strings.Contains(mp, "/kubernetes.io~csi/") && !strings.Contains(mp, "/kubernetes.io/csi/") {
			continue
		}
		if uid != "" && !strings.Contains(mp, "/pods/"+uid+"/") {
			continue
		}
		mps = append(mps, nodeMount{point: mp, opts: f[5], fstype: fstype})
	}
	return mps
}

// meminfo reads one /proc/meminfo field of the node, in KiB.
func (e *env) meminfo(t *testing.T, field string) int64 {
	t.Helper()
	for _, l := range strings.Split(e.nodeShell(t, `cat /proc/meminfo`), "\n") {
		if strings.HasPrefix(l, field+":") {
			f := strings.Fields(l)
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n
		}
	}
	t.Fatalf("/proc/meminfo has no %s", field)
	return 0
}

// localStore is the store folder when the node is this host (the local
// cluster), or "".
func (e *env) localStore() string {
	host, _ := os.Hostname()
	if !strings.EqualFold(host, e.node) {
		return ""
	}
	if fi, err := os.Stat(filepath.Join(e.storeDir, "objects")); err != nil || !fi.IsDir() {
		return ""
	}
	return e.storeDir
}

// evict drops the page cache of store objects (local node only) and
// returns how many KiB of them were resident before.
func evict(t *testing.T, store string, rels ...string) int64 {
	t.Helper()
	var kib int64
	for _, r := range rels {
		p := filepath.Join(store, "objects", filepath.FromSlash(r))
		kib += residentKiB(t, p)
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			t.Fatalf("fadvise %s: %v", p, err)
		}
		f.Close()
	}
	return kib
}

// residentKiB is how much of a file is in the page cache (mincore).
func residentKiB(t *testing.T, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	if fi.Size() == 0 {
		return 0
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap %s: %v", path, err)
	}
	defer unix.Munmap(m)
	pg := os.Getpagesize()
	vec := make([]byte, (len(m)+pg-1)/pg)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatalf("mincore %s: %v", path, errno)
	}
	var n int64
	for _, v := range vec {
		if v&1 != 0 {
			n++
		}
	}
	return n * int64(pg) / 1024
}
