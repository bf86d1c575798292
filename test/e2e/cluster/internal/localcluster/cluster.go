// Package localcluster runs a single-node Kubernetes cluster on this host
// from parts: etcd, containerd and runc from the distribution, the CNI
// plugins, and kube-apiserver, kube-controller-manager and kubelet built by
// k8sbin. Everything listens on 127.0.0.1, and all state (PKI, configs,
// logs, data, the kubelet root, the plugin's store) lives in one work
// directory. Down undoes what Up did to the host, also after a killed run:
// processes (by PID, after checking their command line), mounts, cgroups,
// the CNI bridge, the route it adds and the sysctls the kubelet changes.
package localcluster

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// Fixed names and addresses of the cluster. The service range's first
// address (the kubernetes Service) is reachable on this host through a
// small proxy to the API server, as kube-proxy would make it; every other
// service address is unreachable, so nothing a pod or the plugin tries to
// reach there leaves the machine.
const (
	ServiceCIDR   = "10.96.0.0/16"
	APIServiceIP  = "10.96.0.1"
	ClusterDNS    = "10.96.0.10"
	PodCIDR       = "10.244.0.0/24"
	BridgeName    = "cfse2e0"
	CNINetwork    = "csi-composefs-e2e"
	CgroupRoot    = "csi-composefs-e2e" // pods' cgroups go under /<CgroupRoot>/kubepods
	APIServerPort = 6443
	EtcdPort      = 2379
	KubeletPort   = 10250
	// Sandbox image: the pause image is built locally and imported.
	PauseImage = "e2e.local/pause:3.10"
)

// Cluster is one local cluster and its work directory.
type Cluster struct {
	Work   string    // absolute; holds all state
	K8sBin string    // folder with kube-apiserver, kube-controller-manager, kubelet, kubectl
	Self   string    // this program (runs the service proxy)
	Node   string    // node name (the host name)
	Log    io.Writer // progress
}

// New returns the cluster whose state lives in work.
func New(work, k8sBin string) (*Cluster, error) {
	work, err := filepath.Abs(work)
	if err != nil {
		return nil, err
	}
	if work == "/" || strings.Count(work, "/") < 2 {
		return nil, fmt.Errorf("work directory %q: too close to /, everything under it is unmounted at down", work)
	}
	host, err := os.Hostname()
	if err != nil {
		return nil, fmt.Errorf("host name: %w", err)
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	return &Cluster{Work: work, K8sBin: k8sBin, Self: self, Node: strings.ToLower(host), Log: os.Stderr}, nil
}

func (c *Cluster) path(p ...string) string { return filepath.Join(append([]string{c.Work}, p...)...) }

// Paths inside the work directory.
func (c *Cluster) PKI() string              { return c.path("pki") }
func (c *Cluster) AdminKubeconfig() string  { return c.path("pki", "admin.kubeconfig") }
func (c *Cluster) KubeletRoot() string      { return c.path("run", "kubelet") }
func (c *Cluster) ContainerdSocket() string { return c.path("run", "containerd", "containerd.sock") }
func (c *Cluster) StoreDir() string         { return c.path("store") }
func (c *Cluster) LogDir() string           { return c.path("log") }

func (c *Cluster) bin(name string) string { return filepath.Join(c.K8sBin, name) }

func (c *Cluster) logf(format string, args ...any) {
	fmt.Fprintf(c.Log, "cluster: "+format+"\n", args...)
}
