package deploy

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"

	"github.com/csi-composefs/csi-composefs/cmd/csi-composefs/app"
	"github.com/csi-composefs/csi-composefs/pkg/driver"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

const nodeName = "node-1"

// expandEnv replaces $(VAR) in an argument as the kubelet does, with the
// values the downward API would give.
func expandEnv(t *testing.T, c corev1.Container, arg string) string {
	t.Helper()
	return regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`).ReplaceAllStringFunc(arg, func(ref string) string {
		name := ref[2 : len(ref)-1]
		for _, e := range c.Env {
			if e.Name != name {
				continue
			}
			if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
				return nodeName
			}
			if e.ValueFrom == nil {
				return e.Value
			}
		}
		t.Fatalf("argument %q refers to $(%s), which the container does not define", arg, name)
		return ""
	})
}

// parseServe parses the plugin container's arguments with the binary's own
// serve command and returns the configuration it would serve with.
func parseServe(t *testing.T, c corev1.Container) app.ServeConfig {
	t.Helper()
	if len(c.Command) != 0 {
		t.Fatalf("command %q overrides the image's entry point (the binary)", c.Command)
	}
	if len(c.Args) == 0 || c.Args[0] != "serve" {
		t.Fatalf("args %q: want serve and its flags", c.Args)
	}
	args := make([]string, 0, len(c.Args)-1)
	for _, a := range c.Args[1:] {
		args = append(args, expandEnv(t, c, a))
	}
	var got *app.ServeConfig
	cmd := app.NewServeCommand(app.Command{Version: "test", Run: func(_ context.Context, sc app.ServeConfig) error {
		got = &sc
		return nil
	}})
	cmd.SetArgs(args)
	cmd.SetOut(io.Discard)
	cmd.SetErr(io.Discard)
	if err := cmd.ExecuteContext(context.Background()); err != nil {
		t.Fatalf("serve refuses the DaemonSet's arguments %q: %v", args, err)
	}
	return *got
}

// mounts maps the container's paths to the hostPath volumes behind them.
type mounts struct {
	c       corev1.Container
	volumes map[string]corev1.Volume
}

func mountsOf(ds *appsv1.DaemonSet, c corev1.Container) mounts {
	m := mounts{c: c, volumes: map[string]corev1.Volume{}}
	for _, v := range ds.Spec.Template.Spec.Volumes {
		m.volumes[v.Name] = v
	}
	return m
}

// host returns the host path a container path is on (through the deepest
// hostPath mount above it) and its mount.
func (m mounts) host(t *testing.T, p string) (string, corev1.VolumeMount) {
	t.Helper()
	var best corev1.VolumeMount
	for _, vm := range m.c.VolumeMounts {
		if (p == vm.MountPath || strings.HasPrefix(p, strings.TrimSuffix(vm.MountPath, "/")+"/")) && len(vm.MountPath) > len(best.MountPath) {
			best = vm
		}
	}
	if best.Name == "" {
		t.Fatalf("container %s: %s is on no volume", m.c.Name, p)
	}
	v := m.volumes[best.Name]
	if v.HostPath == nil {
		t.Fatalf("container %s: %s is on volume %s, which is not a hostPath", m.c.Name, p, best.Name)
	}
	return path.Join(v.HostPath.Path, strings.TrimPrefix(p, best.MountPath)), best
}

// TestDaemonSet checks, for default and non-default values, what the
// kubelet needs of the plugin pod: every argument parsed by the binary's
// flag set; the CSI socket, the registration socket and the store on the
// host paths the kubelet and the values name; Bidirectional propagation of
// the pods directory; privileged; probes on the port the binary serves its
// health endpoints on.
func TestDaemonSet(t *testing.T) {
	for _, c := range []struct {
		name            string
		vals            string
		kubeletDir      string
		store           string
		extra           []string
		sidecar         bool
		maxSize         int64
		gc, verify      time.Duration
		allowed, verity string
		concurrency     int
		maxDownloads    int
		grace           time.Duration
		trust, hostNet  bool
		nonCanonical    bool
		limits          [5]int64 // max image, download budget, parse memory, max object, min free
		goMemLimit      string   // "" : from the memory limit
		mirrors         map[string][]string
	}{
		{name: "default", kubeletDir: "/var/lib/kubelet", store: "/var/lib/csi-composefs",
			gc: 10 * time.Minute, verify: 24 * time.Hour, verity: "off", concurrency: 256, maxDownloads: 256,
			grace: 10 * time.Minute, hostNet: true, limits: [5]int64{128 << 20, 1 << 30, 256 << 20, 16 << 30, 1 << 30}},
		{name: "non-default", vals: nonDefault, kubeletDir: "/var/snap/microk8s/common/var/lib/kubelet", store: "/mnt/verity/csi-composefs",
			extra: []string{"/sysroot/ostree/repo/objects", "/var/lib/composefs/objects"}, sidecar: true, maxSize: 20 << 30,
			gc: 5 * time.Minute, verify: 0, allowed: "https://repo.example.com/apps/ http://10.0.0.5:8080/", verity: "userspace", concurrency: 4, maxDownloads: 64,
			grace: -1, trust: true, nonCanonical: true, limits: [5]int64{64 << 20, -1, 512 << 20, 1 << 40, 10 << 30}, goMemLimit: "900MiB",
			mirrors: map[string][]string{"docker.io": {"https://mirror.example.com", "http://127.0.0.1:30020"}, "registry.example.com:5000": {"https://cache.example.com/v2-proxy"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var vals map[string]any
			if c.vals != "" {
				vals = values(t, c.vals)
			}
			objs := mustRender(t, vals, renderOpts{}).objects
			ds := only[*appsv1.DaemonSet](t, objs)
			csiDriver := only[*storagev1.CSIDriver](t, objs)
			plugin := containerOf(t, ds, "csi-composefs")
			cfg := parseServe(t, plugin)
			m := mountsOf(ds, plugin)

			if cfg.Driver.DriverName != csiDriver.Name {
				t.Errorf("--driver-name %q, CSIDriver %q", cfg.Driver.DriverName, csiDriver.Name)
			}
			if cfg.Driver.NodeID != nodeName {
				t.Errorf("node id %q, want the node's name from the downward API", cfg.Driver.NodeID)
			}
			if env := plugin.Env; len(env) == 0 || env[0].ValueFrom == nil || env[0].ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
				t.Errorf("env %+v: NODE_NAME should come from spec.nodeName", env)
			}
			if p := plugin.SecurityContext; p == nil || p.Privileged == nil || !*p.Privileged {
				t.Error("the plugin container is not privileged (Bidirectional propagation needs it)")
			}

			// The CSI socket, where the kubelet dials it.
			network, addr, err := driver.ParseEndpoint(cfg.Endpoint)
			if err != nil || network != "unix" {
				t.Fatalf("endpoint %q: %v", cfg.Endpoint, err)
			}
			wantSock := path.Join(c.kubeletDir, "plugins", csiDriver.Name, "csi.sock")
			if h, _ := m.host(t, addr); h != wantSock {
				t.Errorf("CSI socket %s is %s on the host, want %s", addr, h, wantSock)
			}
			// The pods directory: target paths are the kubelet's, and mounts
			// go back to the host.
			podsDir := path.Join(c.kubeletDir, "pods")
			h, vm := m.host(t, podsDir+"/uid/volumes/kubernetes.io~csi/v/mount")
			if h != podsDir+"/uid/volumes/kubernetes.io~csi/v/mount" || vm.MountPropagation == nil || *vm.MountPropagation != corev1.MountPropagationBidirectional {
				t.Errorf("pods directory: host %s, mount %+v; want the same path, Bidirectional", h, vm)
			}
			// The store and the extra object directories.
			if h, vm := m.host(t, cfg.StoreDir); h != c.store || vm.ReadOnly {
				t.Errorf("store %s is %s on the host (read-only %v), want %s writable", cfg.StoreDir, h, vm.ReadOnly, c.store)
			}
			if len(cfg.Driver.ExtraObjectDirs) != len(c.extra) {
				t.Errorf("extra object dirs %q, want %q", cfg.Driver.ExtraObjectDirs, c.extra)
			}
			for i, d := range cfg.Driver.ExtraObjectDirs {
				if h, vm := m.host(t, d); h != c.extra[i] || !vm.ReadOnly {
					t.Errorf("extra object dir %s: host %s, read-only %v; want %s read-only", d, h, vm.ReadOnly, c.extra[i])
				}
			}
			// A writable /tmp on a read-only root (private erofs directories).
			if p := plugin.SecurityContext; p.ReadOnlyRootFilesystem != nil && *p.ReadOnlyRootFilesystem {
				tmp := false
				for _, vm := range plugin.VolumeMounts {
					tmp = tmp || vm.MountPath == "/tmp" && !vm.ReadOnly && m.volumes[vm.Name].EmptyDir != nil
				}
				if !tmp {
					t.Error("read-only root without a writable emptyDir at /tmp")
				}
			}

			// Registration: built in, or the sidecar's.
			regDir := path.Join(c.kubeletDir, "plugins_registry")
			regSock := path.Join(regDir, csiDriver.Name+"-reg.sock")
			if !c.sidecar {
				if !cfg.Registration.Enabled || len(ds.Spec.Template.Spec.Containers) != 1 {
					t.Fatalf("builtin registration: %+v, %d containers", cfg.Registration, len(ds.Spec.Template.Spec.Containers))
				}
				if h, _ := m.host(t, cfg.Registration.Socket); h != regSock {
					t.Errorf("registration socket %s is %s on the host, where the kubelet looks for %s", cfg.Registration.Socket, h, regSock)
				}
				if cfg.Registration.Endpoint != wantSock {
					t.Errorf("GetInfo would name %s, the CSI socket is %s on the host", cfg.Registration.Endpoint, wantSock)
				}
			} else {
				if cfg.Registration.Enabled {
					t.Error("sidecar mode, but the plugin registers too")
				}
				reg := containerOf(t, ds, "node-driver-registrar")
				rm := mountsOf(ds, reg)
				flags := map[string]string{}
				for _, a := range reg.Args {
					k, v, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
					flags[k] = v
				}
				if flags["kubelet-registration-path"] != wantSock {
					t.Errorf("registrar --kubelet-registration-path %q, want %s", flags["kubelet-registration-path"], wantSock)
				}
				if h, _ := rm.host(t, flags["csi-address"]); h != wantSock {
					t.Errorf("registrar --csi-address %q is %s on the host, want %s", flags["csi-address"], h, wantSock)
				}
				if h, _ := rm.host(t, "/registration/x-reg.sock"); h != regDir+"/x-reg.sock" {
					t.Errorf("registrar's /registration is %s on the host, want %s", h, regDir)
				}
				if !strings.HasSuffix(reg.Image, ":v2.99.0") || reg.LivenessProbe == nil {
					t.Errorf("registrar image %s, liveness %+v", reg.Image, reg.LivenessProbe)
				}
			}

			// Values reach the flags.
			if cfg.Store.MaxSize != c.maxSize || cfg.Driver.GCInterval != c.gc || cfg.Driver.VerifyInterval != c.verify ||
				strings.Join(cfg.Driver.AllowedSources, " ") != c.allowed || string(cfg.Driver.MinVerity) != c.verity ||
				cfg.Store.Parallelism != c.concurrency || cfg.Store.MaxConcurrentDownloads != c.maxDownloads {
				t.Errorf("serve config %+v / %+v from the values", cfg.Store, cfg.Driver)
			}

			if got := cfg.Driver.Registries.Mirrors; len(got) != len(c.mirrors) || (len(c.mirrors) > 0 && !reflect.DeepEqual(got, c.mirrors)) {
				t.Errorf("registry mirrors %v from the values, want %v", got, c.mirrors)
			}
			if cfg.Store.GCGrace != c.grace || cfg.Driver.TrustSharedContent != c.trust {
				t.Errorf("GC grace %v, trust shared content %v; want %v, %v", cfg.Store.GCGrace, cfg.Driver.TrustSharedContent, c.grace, c.trust)
			}
			if cfg.Store.AllowNonCanonicalImages != c.nonCanonical {
				t.Errorf("allow non-canonical images %v, want %v", cfg.Store.AllowNonCanonicalImages, c.nonCanonical)
			}
			if got := [5]int64{cfg.Store.MaxImageSize, cfg.Store.DownloadBudget, cfg.Store.ParseMemory, cfg.Store.MaxObjectSize, cfg.Store.MinFreeSpace}; got != c.limits {
				t.Errorf("limits %v from the values, want %v", got, c.limits)
			}
			// The plugin reaches what the node reaches, and still resolves
			// cluster names.
			if spec := ds.Spec.Template.Spec; spec.HostNetwork != c.hostNet ||
				(c.hostNet && spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet) {
				t.Errorf("hostNetwork %v, dnsPolicy %q; want hostNetwork %v", spec.HostNetwork, spec.DNSPolicy, c.hostNet)
			}
			// GOMEMLIMIT follows the memory limit unless given.
			var memEnv *corev1.EnvVar
			for i := range plugin.Env {
				if plugin.Env[i].Name == "GOMEMLIMIT" {
					memEnv = &plugin.Env[i]
				}
			}
			switch {
			case memEnv == nil:
				t.Error("no GOMEMLIMIT: the Go runtime would not collect harder near the memory limit")
			case c.goMemLimit != "" && memEnv.Value != c.goMemLimit:
				t.Errorf("GOMEMLIMIT %q, want %q", memEnv.Value, c.goMemLimit)
			case c.goMemLimit == "" && (memEnv.ValueFrom == nil || memEnv.ValueFrom.ResourceFieldRef == nil ||
				memEnv.ValueFrom.ResourceFieldRef.Resource != "limits.memory" || plugin.Resources.Limits.Memory().IsZero()):
				t.Errorf("GOMEMLIMIT %+v, want it from limits.memory (limits %v)", memEnv, plugin.Resources.Limits)
			}

			checkProbes(t, ds, plugin, cfg)
		})
	}
}

// checkProbes: the liveness and readiness probes hit the port of
// --metrics-address, on paths the plugin's HTTP handler answers: a real
// driver's handler says not ready before recovery and ready after.
func checkProbes(t *testing.T, ds *appsv1.DaemonSet, plugin corev1.Container, cfg app.ServeConfig) {
	t.Helper()
	_, portStr, err := net.SplitHostPort(cfg.MetricsAddr)
	if err != nil {
		t.Fatalf("--metrics-address %q: %v", cfg.MetricsAddr, err)
	}
	for name, p := range map[string]*corev1.Probe{"liveness": plugin.LivenessProbe, "readiness": plugin.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil {
			t.Fatalf("no HTTP %s probe", name)
		}
		port := p.HTTPGet.Port.String()
		if p.HTTPGet.Port.StrVal != "" {
			port = strconv.Itoa(int(containerPort(t, ds, plugin.Name, p.HTTPGet.Port.StrVal)))
		}
		if port != portStr {
			t.Errorf("%s probe on port %s; the plugin serves health on %s", name, port, portStr)
		}
	}
	if plugin.LivenessProbe.HTTPGet.Path != driver.HealthzPath || plugin.ReadinessProbe.HTTPGet.Path != driver.ReadyzPath {
		t.Errorf("probe paths %s, %s; want %s, %s", plugin.LivenessProbe.HTTPGet.Path, plugin.ReadinessProbe.HTTPGet.Path, driver.HealthzPath, driver.ReadyzPath)
	}

	st, err := fetch.Open(context.Background(), t.TempDir(), fetch.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	d, err := driver.New(driver.Config{NodeID: nodeName, DriverName: cfg.Driver.DriverName}, st)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	srv := httptest.NewServer(d.HTTPHandler())
	defer srv.Close()
	get := func(p string) int {
		resp, err := http.Get(srv.URL + p)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(plugin.LivenessProbe.HTTPGet.Path); code != http.StatusOK {
		t.Errorf("liveness path answers %d while recovering, want 200", code)
	}
	if code := get(plugin.ReadinessProbe.HTTPGet.Path); code != http.StatusServiceUnavailable {
		t.Errorf("readiness path answers %d before recovery, want 503", code)
	}
	if err := d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	if code := get(plugin.ReadinessProbe.HTTPGet.Path); code != http.StatusOK {
		t.Errorf("readiness path answers %d after recovery, want 200", code)
	}
}
