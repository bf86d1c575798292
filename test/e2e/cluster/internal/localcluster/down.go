package localcluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// daemons in the order Down stops them (the reverse of Up's).
var stopOrder = []string{"repo-server", "kubelet", "kube-scheduler", "kube-controller-manager", "svc-proxy", "containerd", "kube-apiserver", "etcd"}

// Down stops the cluster and undoes its changes to the host. It is
// idempotent and also cleans up after a killed run: daemons are stopped by
// their recorded PID after checking it is still them, and the cluster's
// programs still naming the work directory are found in /proc. The work
// directory is emptied except log/.
func (c *Cluster) Down(ctx context.Context) error {
	start := time.Now()
	c.drainPods(ctx)
	for _, d := range stopOrder {
		grace := 10 * time.Second
		if d == "kubelet" {
			c.stopDaemon(d, grace)
			c.killCgroupProcs() // pod containers and sandboxes
			continue
		}
		c.stopDaemon(d, grace)
	}
	c.killCgroupProcs()
	for _, pid := range c.strayProcesses() {
		argv, _ := procCmdline(pid)
		c.logf("stopping stray %s (pid %d)", filepath.Base(argv[0]), pid)
		c.killPID(pid, 5*time.Second)
	}
	var errs []error
	if err := c.unmountAll(); err != nil {
		errs = append(errs, err)
	}
	if err := c.removeCgroups(); err != nil {
		errs = append(errs, err)
	}
	if err := c.teardownNetwork(); err != nil {
		errs = append(errs, err)
	}
	if err := c.restoreHost(); err != nil {
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		if err := c.emptyWork(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("down: %w", errors.Join(errs...))
	}
	c.logf("down in %s", time.Since(start).Round(100*time.Millisecond))
	return nil
}

// drainPods deletes every pod through the API while the kubelet and the
// CSI plugin still run, so that volumes are unpublished as in a real
// cluster: workload pods first, then DaemonSets (the plugin) and the rest.
// It gives up after a minute; what is left is killed and unmounted.
func (c *Cluster) drainPods(ctx context.Context) {
	if _, ok := c.daemonAlive("kube-apiserver"); !ok {
		return
	}
	if _, ok := c.daemonAlive("kubelet"); !ok {
		return
	}
	cs, err := c.Clientset()
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	isDaemon := func(p *corev1.Pod) bool {
		for _, o := range p.OwnerReferences {
			if o.Kind == "DaemonSet" {
				return true
			}
		}
		return false
	}
	c.deletePods(ctx, cs, func(p *corev1.Pod) bool { return !isDaemon(p) })
	if dss, err := cs.AppsV1().DaemonSets("").List(ctx, metav1.ListOptions{}); err == nil {
		for _, ds := range dss.Items {
			orphan := metav1.DeletePropagationBackground
			_ = cs.AppsV1().DaemonSets(ds.Namespace).Delete(ctx, ds.Name, metav1.DeleteOptions{PropagationPolicy: &orphan})
		}
	}
	c.deletePods(ctx, cs, func(*corev1.Pod) bool { return true })
}

func (c *Cluster) deletePods(ctx context.Context, cs kubernetes.Interface, which func(*corev1.Pod) bool) {
	grace := int64(5)
	pods, err := cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	var left []corev1.Pod
	for i := range pods.Items {
		p := &pods.Items[i]
		if !which(p) {
			continue
		}
		if err := cs.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace}); err == nil {
			left = append(left, *p)
		}
	}
	if len(left) == 0 {
		return
	}
	c.logf("deleting %d pods", len(left))
	for ctx.Err() == nil {
		n := 0
		for _, p := range left {
			if _, err := cs.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{}); err == nil {
				n++
			}
		}
		if n == 0 {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	c.logf("warning: pods still there after the drain timeout; killing them")
}

// emptyWork removes everything in the work directory but log/, after
// checking that nothing is mounted under it any more.
func (c *Cluster) emptyWork() error {
	mps, err := mountsUnder(c.Work)
	if err != nil {
		return err
	}
	if len(mps) > 0 {
		return fmt.Errorf("not emptying %s: still mounted: %v", c.Work, mps)
	}
	ents, err := os.ReadDir(c.Work)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range ents {
		if e.Name() == "log" {
			continue
		}
		if err := os.RemoveAll(filepath.Join(c.Work, e.Name())); err != nil {
			return err
		}
	}
	return nil
}
