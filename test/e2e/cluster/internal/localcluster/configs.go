package localcluster

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// writeConfigs writes containerd's, the kubelet's and CNI's configuration.
// Each setting that is there because of this kind of host says why.
func (c *Cluster) writeConfigs() error {
	for _, d := range []string{"etc", "cni/net.d", "cni/ipam", "log/pods", "run/containerd", "data", "state"} {
		if err := os.MkdirAll(c.path(d), 0o755); err != nil {
			return err
		}
	}
	containerd := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[4]q
  disable_apparmor = true
  # CAP_SYS_RESOURCE may be missing from the bounding set (VMs, nested
  # containers): runc then cannot set the kubelet's oom_score_adj of -998 and
  # every sandbox fails; clamp to containerd's own score instead.
  restrict_oom_score_adj = true
  # Network namespaces under the state folder, not /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # cgroupfs, as the kubelet: a host without systemd as PID 1.
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %[5]q
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""
`, c.path("data", "containerd"), c.path("state", "containerd"), c.ContainerdSocket(), PauseImage, c.path("cni", "net.d"))
	if err := os.WriteFile(c.path("etc", "containerd.toml"), []byte(containerd), 0o644); err != nil {
		return err
	}

	// A bridge without a gateway: pods get an address on the bridge and no
	// default route, so nothing a pod sends can leave the host (the tests'
	// pods that need the network use the host's, on loopback).
	cni := map[string]any{
		"cniVersion": "1.0.0",
		"name":       CNINetwork,
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": BridgeName, "isGateway": false, "ipMasq": false, "hairpinMode": true,
				"ipam": map[string]any{
					"type":    "host-local",
					"ranges":  [][]map[string]string{{{"subnet": PodCIDR}}},
					"dataDir": c.path("cni", "ipam"),
				},
			},
			map[string]any{"type": "loopback"},
		},
	}
	raw, _ := json.MarshalIndent(cni, "", "  ")
	if err := os.WriteFile(c.path("cni", "net.d", "10-e2e.conflist"), raw, 0o644); err != nil {
		return err
	}

	pki := c.PKI()
	kubelet := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 hosts: kubelet >= 1.35 refuses them unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
# Pods' cgroups under a root of their own, removed at down.
cgroupRoot: /%[9]s
containerRuntimeEndpoint: unix://%[1]s
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %[2]s}
authorization: {mode: Webhook}
tlsCertFile: %[3]s
tlsPrivateKeyFile: %[4]s
address: 127.0.0.1
port: %[5]d
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
clusterDomain: cluster.local
clusterDNS: [%[6]s]
# The kubelet rewrites some kernel sysctls; true would make it refuse to
# start instead. Down restores the values saved before it started.
protectKernelDefaults: false
makeIPTablesUtilChains: false
failSwapOn: false
podLogsDir: %[7]s
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
syncFrequency: 10s
fileCheckFrequency: 5s
nodeStatusUpdateFrequency: 5s
serializeImagePulls: false
staticPodPath: ""
resolvConf: %[8]s
`, c.ContainerdSocket(), filepath.Join(pki, "ca.crt"), filepath.Join(pki, "kubelet-serving.crt"),
		filepath.Join(pki, "kubelet-serving.key"), KubeletPort, ClusterDNS, c.path("log", "pods"),
		c.path("etc", "resolv.conf"), CgroupRoot)
	if err := os.WriteFile(c.path("etc", "kubelet.yaml"), []byte(kubelet), 0o644); err != nil {
		return err
	}
	// Pods with dnsPolicy Default (and host-network pods) get no name
	// server: the tests use addresses, and no lookup leaves the host.
	return os.WriteFile(c.path("etc", "resolv.conf"), []byte("# csi-composefs e2e: no name server\noptions ndots:1\n"), 0o644)
}
