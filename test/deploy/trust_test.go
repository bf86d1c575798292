package deploy

import (
	"path"
	"path/filepath"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/csi-composefs/csi-composefs/pkg/trust"
)

// TestTrustPolicy: the chart's trust policy reaches the plugin as a file
// it parses, on a ConfigMap volume mounted whole (a subPath mount never
// sees the ConfigMap's updates, and the plugin reloads on change), and
// without a policy there is neither ConfigMap nor flag.
func TestTrustPolicy(t *testing.T) {
	for _, c := range []struct {
		name, vals string
		configMap  string // the ConfigMap the volume names; "" = no policy
		rendered   bool   // the chart renders it
		poll       time.Duration
	}{
		{name: "default"},
		{name: "sources", vals: nonDefault, configMap: "csi-composefs-trust-policy", rendered: true, poll: 30 * time.Second},
		{name: "existing ConfigMap", vals: "trustPolicy: {existingConfigMap: site-trust, sources: [{prefix: \"*\"}]}", configMap: "site-trust", poll: 10 * time.Second},
	} {
		t.Run(c.name, func(t *testing.T) {
			var vals map[string]any
			if c.vals != "" {
				vals = values(t, c.vals)
			}
			objs := mustRender(t, vals, renderOpts{}).objects
			ds := only[*appsv1.DaemonSet](t, objs)
			plugin := containerOf(t, ds, "csi-composefs")
			cfg := parseServe(t, plugin)
			cms := find[*corev1.ConfigMap](objs)
			if c.configMap == "" {
				if cfg.Trust.PolicyFile != "" || len(cms) != 0 {
					t.Fatalf("no policy in the values: --trust-policy %q, %d ConfigMaps", cfg.Trust.PolicyFile, len(cms))
				}
				return
			}
			if cfg.Trust.PolicyFile == "" || cfg.Trust.Poll != c.poll {
				t.Fatalf("--trust-policy %q, poll %v; want a policy file polled every %v", cfg.Trust.PolicyFile, cfg.Trust.Poll, c.poll)
			}
			checkPolicyMount(t, ds, plugin, cfg.Trust.PolicyFile, c.configMap)
			if !c.rendered {
				if len(cms) != 0 {
					t.Fatalf("existingConfigMap given, but the chart renders %d ConfigMaps", len(cms))
				}
				return
			}
			if len(cms) != 1 || cms[0].Name != c.configMap || cms[0].Namespace != releaseNamespace {
				t.Fatalf("ConfigMaps %+v, want %s in %s", cms, c.configMap, releaseNamespace)
			}
			data, ok := cms[0].Data[path.Base(cfg.Trust.PolicyFile)]
			if !ok {
				t.Fatalf("ConfigMap keys %v, the plugin reads %s", cms[0].Data, path.Base(cfg.Trust.PolicyFile))
			}
			p, err := trust.ParsePolicy([]byte(data))
			if err != nil {
				t.Fatalf("the plugin refuses the chart's policy: %v\n%s", err, data)
			}
			r := p.Rule("https://repo.example.com/apps/web")
			if r == nil || !r.Require || len(r.Keys) != 1 || r.Keys[0].Name != "apps-2026" {
				t.Errorf("rule for the apps repository: %+v", r)
			}
			if r := p.Rule("https://other.example.com"); r == nil || r.Prefix != trust.AnySource || r.Require {
				t.Errorf("rule for another source: %+v, want the \"*\" rule, not requiring", r)
			}
		})
	}
}

// TestTrustPolicyOverlay: the overlay the examples README shows with the
// trust-policy component builds on the base; the plugin gets --trust-policy on the ConfigMap's volume, mounted
// whole and read-only; the ConfigMap keeps its name (no hash suffix, so an
// edit reaches the nodes in place) and holds a policy the plugin parses.
func TestTrustPolicyOverlay(t *testing.T) {
	objs := readmeOverlay(t, "# kustomization.yaml of your overlay, with a trust policy",
		map[string]string{"trust-policy": filepath.Join(kustomDir, "examples", "trust-policy")})
	ds := only[*appsv1.DaemonSet](t, objs)
	plugin := containerOf(t, ds, "csi-composefs")
	cfg := parseServe(t, plugin)
	if cfg.Trust.PolicyFile == "" {
		t.Fatal("no --trust-policy")
	}
	cm := only[*corev1.ConfigMap](t, objs)
	checkPolicyMount(t, ds, plugin, cfg.Trust.PolicyFile, cm.Name)
	if cm.Name != "csi-composefs-trust-policy" || cm.Namespace != ds.Namespace {
		t.Errorf("ConfigMap %s/%s, want csi-composefs-trust-policy (no hash suffix) in %s", cm.Namespace, cm.Name, ds.Namespace)
	}
	data, ok := cm.Data[path.Base(cfg.Trust.PolicyFile)]
	if !ok {
		t.Fatalf("ConfigMap keys %v, the plugin reads %s", cm.Data, path.Base(cfg.Trust.PolicyFile))
	}
	p, err := trust.ParsePolicy([]byte(data))
	if err != nil {
		t.Fatalf("the plugin refuses the example's policy: %v\n%s", err, data)
	}
	if r := p.Rule("https://repo.example.com/apps/web"); r == nil || !r.Require || len(r.Keys) != 1 {
		t.Errorf("rule for the example repository: %+v, want signatures required by one key", r)
	}
	if r := p.Rule("https://other.example.com"); r == nil || r.Prefix != trust.AnySource || r.Require {
		t.Errorf("rule for another source: %+v, want the \"*\" rule, not requiring", r)
	}
}

// checkPolicyMount checks that the policy file is on the whole ConfigMap
// configMap, mounted read-only as a directory (a subPath mount never sees
// the ConfigMap's updates).
func checkPolicyMount(t *testing.T, ds *appsv1.DaemonSet, plugin corev1.Container, policyFile, configMap string) {
	t.Helper()
	var vm *corev1.VolumeMount
	for i := range plugin.VolumeMounts {
		if m := &plugin.VolumeMounts[i]; m.MountPath == path.Dir(policyFile) {
			vm = m
		}
	}
	if vm == nil || vm.SubPath != "" || !vm.ReadOnly {
		t.Fatalf("--trust-policy %s: mount %+v; want its directory mounted read-only, without subPath", policyFile, vm)
	}
	var vol *corev1.Volume
	for i := range ds.Spec.Template.Spec.Volumes {
		if v := &ds.Spec.Template.Spec.Volumes[i]; v.Name == vm.Name {
			vol = v
		}
	}
	if vol == nil || vol.ConfigMap == nil || vol.ConfigMap.Name != configMap || len(vol.ConfigMap.Items) != 0 {
		t.Fatalf("volume %+v, want the whole ConfigMap %s", vol, configMap)
	}
}
