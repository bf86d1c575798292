package localcluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"golang.org/x/sys/unix"
)

// Up starts the cluster and waits until its node is Ready, then imports
// the image tarballs (docker-save format) into containerd's CRI namespace.
// Call Down first: it clears what a killed run left.
func (c *Cluster) Up(ctx context.Context, images []string) error {
	start := time.Now()
	for _, bin := range []string{"etcd", "containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("%s not found: install the distribution's packages (test/e2e/cluster/install-deps.sh)", bin)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		return fmt.Errorf("CNI plugins not found in /usr/lib/cni: install containernetworking-plugins")
	}
	for _, p := range []int{EtcdPort, EtcdPort + 1, EtcdPort + 2, APIServerPort, KubeletPort, 10248, 10257, 10259} {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return fmt.Errorf("port 127.0.0.1:%d is taken (another cluster running?): %w", p, err)
		}
		l.Close()
	}
	if err := os.MkdirAll(c.Work, 0o755); err != nil {
		return err
	}
	// Each run's logs start empty (Down keeps the last run's for a look).
	if err := os.RemoveAll(c.LogDir()); err != nil {
		return err
	}
	if err := c.writePKI(); err != nil {
		return err
	}
	if err := c.writeConfigs(); err != nil {
		return err
	}
	if err := c.saveHost(); err != nil {
		return err
	}
	if err := c.setupNetwork(); err != nil {
		return err
	}
	pki := c.PKI()
	p := func(n string) string { return filepath.Join(pki, n) }

	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", EtcdPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", EtcdPort+1)
	if err := c.startDaemon("etcd", nil, mustLook("etcd"),
		"--name=e2e", "--data-dir="+c.path("data", "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=e2e="+peerURL,
		fmt.Sprintf("--listen-metrics-urls=http://127.0.0.1:%d", EtcdPort+2)); err != nil {
		return err
	}
	if err := c.startDaemon("containerd", nil, mustLook("containerd"), "--config="+c.path("etc", "containerd.toml")); err != nil {
		return err
	}
	if err := c.waitFor("etcd", "etcd", time.Minute, func() error { return httpOK(nil, etcdURL+"/health") }); err != nil {
		return err
	}
	if err := c.startDaemon("kube-apiserver", nil, c.bin("kube-apiserver"),
		"--etcd-servers="+etcdURL,
		"--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", APIServerPort),
		"--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"),
		"--client-ca-file="+p("ca.crt"),
		"--service-account-key-file="+p("sa.pub"), "--service-account-signing-key-file="+p("sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range="+ServiceCIDR,
		"--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		"--kubelet-client-certificate="+p("apiserver-kubelet-client.crt"), "--kubelet-client-key="+p("apiserver-kubelet-client.key"),
		// The node's host name resolves to loopback, where the kubelet listens.
		"--kubelet-preferred-address-types=Hostname",
		"--profiling=false"); err != nil {
		return err
	}
	admin, err := adminTLS(pki)
	if err != nil {
		return err
	}
	apiURL := fmt.Sprintf("https://127.0.0.1:%d", APIServerPort)
	if err := c.waitFor("kube-apiserver", "kube-apiserver", 2*time.Minute, func() error { return httpOK(admin, apiURL+"/readyz") }); err != nil {
		return err
	}
	cs, err := c.Clientset()
	if err != nil {
		return err
	}
	if err := c.startDaemon("kube-controller-manager", nil, c.bin("kube-controller-manager"),
		"--kubeconfig="+p("controller-manager.kubeconfig"),
		"--authentication-kubeconfig="+p("controller-manager.kubeconfig"),
		"--authorization-kubeconfig="+p("controller-manager.kubeconfig"),
		"--bind-address=127.0.0.1", "--secure-port=10257",
		"--root-ca-file="+p("ca.crt"), "--service-account-private-key-file="+p("sa.key"),
		"--use-service-account-credentials=true", "--controllers=*", "--leader-elect=false",
		"--profiling=false"); err != nil {
		return err
	}
	if err := c.startDaemon("kube-scheduler", nil, c.bin("kube-scheduler"),
		"--kubeconfig="+p("scheduler.kubeconfig"),
		"--authentication-kubeconfig="+p("scheduler.kubeconfig"),
		"--authorization-kubeconfig="+p("scheduler.kubeconfig"),
		"--bind-address=127.0.0.1", "--secure-port=10259", "--leader-elect=false",
		"--profiling=false"); err != nil {
		return err
	}
	// The kubernetes Service address, for pods with in-cluster clients on
	// the host network (the plugin posts events): what kube-proxy would do.
	if err := c.startDaemon("svc-proxy", nil, c.Self, "svc-proxy", "--work="+c.Work,
		fmt.Sprintf("--listen=%s:443", APIServiceIP), fmt.Sprintf("--to=127.0.0.1:%d", APIServerPort)); err != nil {
		return err
	}
	if err := c.waitFor("service account default/default", "kube-controller-manager", 2*time.Minute, func() error {
		_, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		return err
	}

	if err := c.makeCgroupRoot(); err != nil {
		return err
	}
	// The kubelet root as a shared mount of its own: / may be private, and
	// a containerized CSI plugin needs Bidirectional propagation from it.
	root := c.KubeletRoot()
	if err := os.MkdirAll(root, 0o750); err != nil {
		return err
	}
	if mps, _ := mountsUnder(root); !contains(mps, root) {
		if err := unix.Mount(root, root, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind-mounting %s: %w", root, err)
		}
	}
	if err := unix.Mount("", root, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("making %s rshared: %w", root, err)
	}
	if err := c.waitFor("containerd", "containerd", time.Minute, func() error {
		return exec.Command("ctr", "--address", c.ContainerdSocket(), "version").Run()
	}); err != nil {
		return err
	}
	if err := c.ImportImages(ctx, images...); err != nil {
		return err
	}
	if err := c.startDaemon("kubelet", nil, c.bin("kubelet"),
		"--config="+c.path("etc", "kubelet.yaml"),
		"--kubeconfig="+p("kubelet.kubeconfig"),
		"--root-dir="+root, "--cert-dir="+c.path("run", "kubelet-pki"),
		"--hostname-override="+c.Node, "--v=2"); err != nil {
		return err
	}
	if err := c.waitFor("node "+c.Node, "kubelet", 2*time.Minute, func() error {
		n, err := cs.CoreV1().Nodes().Get(ctx, c.Node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
				return nil
			}
		}
		return errNotReady
	}); err != nil {
		return err
	}
	c.logf("up in %s; export KUBECONFIG=%s", time.Since(start).Round(100*time.Millisecond), c.AdminKubeconfig())
	return nil
}

// ImportImages imports docker-save tarballs into containerd's CRI
// namespace (pods then use them with imagePullPolicy Never or IfNotPresent).
func (c *Cluster) ImportImages(ctx context.Context, tars ...string) error {
	for _, t := range tars {
		out, err := exec.CommandContext(ctx, "ctr", "--address", c.ContainerdSocket(), "-n", "k8s.io", "images", "import", t).CombinedOutput()
		if err != nil {
			return fmt.Errorf("importing %s: %w: %s", t, err, out)
		}
		c.logf("imported %s: %s", filepath.Base(t), strings.TrimSpace(string(out)))
	}
	return nil
}

// Clientset is an admin client of the cluster.
func (c *Cluster) Clientset() (*kubernetes.Clientset, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", c.AdminKubeconfig())
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}

func adminTLS(pki string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(pki, "admin.crt"), filepath.Join(pki, "admin.key"))
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(filepath.Join(pki, "ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("ca.crt: no certificate")
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

func httpOK(tc *tls.Config, url string) error {
	cl := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: tc}}
	resp, err := cl.Get(url)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}

func mustLook(bin string) string {
	if p, err := exec.LookPath(bin); err == nil {
		if abs, err := filepath.Abs(p); err == nil {
			return abs
		}
		return p
	}
	return bin
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
