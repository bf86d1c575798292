package suite

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// env is what every case shares: the cluster, the repository, the CLI.
type env struct {
	cfg       *rest.Config
	cs        kubernetes.Interface
	repo      *repoServer
	cli       string
	busybox   string
	release   string
	namespace string
	chart     string
	node      string // the node the tests run on (single-node clusters)
	driver    string // CSI driver name
	storeDir  string // the plugin's store on the node (its hostPath)
}

var (
	envOnce sync.Once
	envVal  *env
	envErr  error
)

func getenv(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// setup returns the shared environment, failing the case when the
// cluster or the driver is not there.
func setup(t *testing.T) *env {
	t.Helper()
	runCase(t)
	envOnce.Do(func() { envVal, envErr = newEnv() })
	if envErr != nil {
		t.Fatalf("e2e environment: %v", envErr)
	}
	return envVal
}

func newEnv() (*env, error) {
	kc := os.Getenv("KUBECONFIG")
	if kc == "" {
		kc = filepath.Join(getenv("E2E_WORK", "/var/tmp/csi-composefs-e2e"), "pki", "admin.kubeconfig")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kc)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", kc, err)
	}
	cfg.QPS, cfg.Burst = 50, 100
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	e := &env{cfg: cfg, cs: cs,
		busybox:   getenv("E2E_BUSYBOX", "e2e.local/busybox:1"),
		release:   getenv("E2E_RELEASE", "csi-composefs"),
		namespace: getenv("E2E_NAMESPACE", "csi-composefs"),
		driver:    getenv("E2E_DRIVER", "composefs.csi.dev"),
	}
	root, err := repoRoot()
	if err != nil {
		return nil, err
	}
	e.chart = getenv("E2E_CHART", filepath.Join(root, "charts", "csi-composefs"))
	if e.cli = os.Getenv("E2E_CLI"); e.cli == "" {
		e.cli = filepath.Join(os.TempDir(), fmt.Sprintf("csi-composefs-e2e-cli-%d", os.Getpid()))
		out, err := exec.Command("go", "build", "-C", root, "-o", e.cli, "./cmd/csi-composefs").CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("building the CLI: %w\n%s", err, out)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("listing nodes: %w", err)
	}
	if len(nodes.Items) == 0 {
		return nil, fmt.Errorf("the cluster has no node")
	}
	e.node = nodes.Items[0].Name
	ds, err := e.daemonSet(ctx)
	if err != nil {
		return nil, err
	}
	if e.storeDir, err = storeHostPath(ds); err != nil {
		return nil, err
	}
	if err := e.waitDaemonSetReady(ctx, 0); err != nil {
		return nil, err
	}
	addr := getenv("E2E_REPO_ADDR", "127.0.0.1:18080")
	e.repo, err = startRepo(addr, getenv("E2E_REPO_URL", "http://"+addr), getenv("E2E_REPO_PREFIX", "/e2e/"))
	if err != nil {
		return nil, err
	}
	return e, nil
}

// repoRoot finds the repository (the folder whose go.mod is the product's)
// above the working directory.
func repoRoot() (string, error) {
	d, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		raw, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && strings.HasPrefix(string(raw), "module github.com/csi-composefs/csi-composefs\n") {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("repository root not found above the working directory")
		}
		d = parent
	}
}

// daemonSet is the driver's DaemonSet of the Helm release.
func (e *env) daemonSet(ctx context.Context) (*appsv1.DaemonSet, error) {
	l, err := e.cs.AppsV1().DaemonSets(e.namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=" + e.release})
	if err != nil {
		return nil, fmt.Errorf("listing DaemonSets of release %s: %w", e.release, err)
	}
	if len(l.Items) != 1 {
		return nil, fmt.Errorf("release %s in namespace %s: %d DaemonSets, want 1 (is the chart installed?)", e.release, e.namespace, len(l.Items))
	}
	return &l.Items[0], nil
}

// storeHostPath is the host folder of the store volume: the hostPath
// volume mounted where the plugin's --store-dir points.
func storeHostPath(ds *appsv1.DaemonSet) (string, error) {
	for _, c := range ds.Spec.Template.Spec.Containers {
		dir := ""
		args := append(append([]string{}, c.Command...), c.Args...)
		for i, a := range args {
			switch {
			case strings.HasPrefix(a, "--store-dir="):
				dir = strings.TrimPrefix(a, "--store-dir=")
			case a == "--store-dir" && i+1 < len(args):
				dir = args[i+1]
			}
		}
		if dir == "" {
			continue
		}
		for _, m := range c.VolumeMounts {
			if m.MountPath != dir && !strings.HasPrefix(dir, strings.TrimSuffix(m.MountPath, "/")+"/") {
				continue
			}
			for _, v := range ds.Spec.Template.Spec.Volumes {
				if v.Name == m.Name && v.HostPath != nil {
					return filepath.Join(v.HostPath.Path, strings.TrimPrefix(dir, m.MountPath)), nil
				}
			}
		}
	}
	return "", fmt.Errorf("DaemonSet %s: no container with --store-dir on a hostPath volume", ds.Name)
}

// waitDaemonSetReady waits until the DaemonSet has rolled out (generation
// observed, every pod updated and ready) and, with minGen > 0, that its
// generation is at least minGen.
func (e *env) waitDaemonSetReady(ctx context.Context, minGen int64) error {
	deadline := time.Now().Add(3 * time.Minute)
	var last string
	for time.Now().Before(deadline) {
		ds, err := e.daemonSet(ctx)
		if err == nil {
			st := ds.Status
			last = fmt.Sprintf("generation %d observed %d, desired %d updated %d ready %d available %d",
				ds.Generation, st.ObservedGeneration, st.DesiredNumberScheduled, st.UpdatedNumberScheduled, st.NumberReady, st.NumberAvailable)
			if st.ObservedGeneration >= ds.Generation && ds.Generation >= minGen && st.DesiredNumberScheduled > 0 &&
				st.UpdatedNumberScheduled == st.DesiredNumberScheduled && st.NumberReady == st.DesiredNumberScheduled &&
				st.NumberAvailable == st.DesiredNumberScheduled {
				return e.waitPluginRegistered(ctx)
			}
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	return fmt.Errorf("driver DaemonSet not rolled out after 3m: %s", last)
}

// waitPluginRegistered waits until the node's CSINode lists the driver.
func (e *env) waitPluginRegistered(ctx context.Context) error {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		n, err := e.cs.StorageV1().CSINodes().Get(ctx, e.node, metav1.GetOptions{})
		if err == nil {
			for _, d := range n.Spec.Drivers {
				if d.Name == e.driver {
					return nil
				}
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	return fmt.Errorf("driver %s not registered on node %s (CSINode)", e.driver, e.node)
}

// pluginPod is the driver's running pod on the node.
func (e *env) pluginPod(ctx context.Context) (*corev1.Pod, error) {
	ds, err := e.daemonSet(ctx)
	if err != nil {
		return nil, err
	}
	sel := metav1.FormatLabelSelector(ds.Spec.Selector)
	l, err := e.cs.CoreV1().Pods(e.namespace).List(ctx, metav1.ListOptions{LabelSelector: sel})
	if err != nil {
		return nil, err
	}
	for i := range l.Items {
		p := &l.Items[i]
		if p.Spec.NodeName == e.node && p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
			return p, nil
		}
	}
	return nil, fmt.Errorf("no running driver pod on node %s", e.node)
}
