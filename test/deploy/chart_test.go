package deploy

import (
	stdjson "encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/lint/support"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
)

// nonDefault sets every value to something other than its default.
const nonDefault = `
image:
  repository: registry.example.com/storage/csi-composefs
  tag: v9.9.9
  digest: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
  pullPolicy: Always
imagePullSecrets:
  - name: regcred
driverName: composefs.example.com
kubeletDir: /var/snap/microk8s/common/var/lib/kubelet
store:
  hostPath: /mnt/verity/csi-composefs
  maxSize: 20G
  gcInterval: 5m
  gcGrace: "0"
  verifyInterval: "0"
hostNetwork: false
trustSharedContent: true
trustPolicy:
  sources:
    - prefix: https://repo.example.com/apps
      requireSignature: true
      keys:
        - name: apps-2026
          publicKey: |
            -----BEGIN PUBLIC KEY-----
            MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE/E6MOz1ddU5T/0anzl8nLOghHpyQ
            4BROIARwcDvkJAvKLyjkar18XJpJE9BcYIN1ZHQeXDDEVBE1CMI9Lf34tA==
            -----END PUBLIC KEY-----
    - prefix: "*"
  existingConfigMap: ""
  pollInterval: 30s
allowNonCanonicalImages: true
limits:
  maxImageSize: 64M
  downloadBudget: "0"
  parseMemory: 512M
  maxObjectSize: 1T
  minFreeSpace: 10G
goMemLimit: 900MiB
allowedSources:
  - https://repo.example.com/apps/
  - http://10.0.0.5:8080/
enableInlineVolumes: false
fetchConcurrency: 4
maxDownloads: 64
minVerity: userspace
registryMirrors:
  docker.io: ["https://mirror.example.com", "http://127.0.0.1:30020/"]
  registry.example.com:5000: ["https://cache.example.com/v2-proxy"]
extraObjectDirs:
  - /sysroot/ostree/repo/objects
  - /var/lib/composefs/objects
registration:
  mode: sidecar
  nodeDriverRegistrar:
    image:
      repository: registry.example.com/sig-storage/csi-node-driver-registrar
      tag: v2.99.0
      pullPolicy: Always
    httpPort: 9909
metrics:
  port: 9999
  serviceMonitor:
    enabled: true
    interval: 1m
    labels:
      release: prometheus
logLevel: 5
resources:
  requests:
    cpu: 50m
  limits:
    memory: 1Gi
nodeSelector:
  node-role.example.com/composefs: "true"
tolerations:
  - key: dedicated
    operator: Equal
    value: storage
    effect: NoSchedule
affinity:
  nodeAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms:
        - matchExpressions:
            - {key: kubernetes.io/arch, operator: In, values: [amd64, arm64]}
priorityClassName: ""
podAnnotations:
  example.com/owner: storage-team
terminationGracePeriodSeconds: 60
updateStrategy:
  maxUnavailable: 10%
seLinuxMount: true
openshift:
  ephemeralVolumeProfile: restricted
serviceAccount:
  create: true
  name: cfs-node
  annotations:
    example.com/note: plugin
rbac:
  create: true
`

// TestChartLint: helm lint passes (nothing above INFO) for default and
// non-default values.
func TestChartLint(t *testing.T) {
	for name, vals := range map[string]map[string]any{"default": nil, "non-default": values(t, nonDefault)} {
		l := action.NewLint()
		l.Namespace = releaseNamespace
		res := l.Run([]string{chartDir}, vals)
		for _, m := range res.Messages {
			if m.Severity > support.InfoSev {
				t.Errorf("%s values: lint: %s", name, m)
			}
		}
		for _, err := range res.Errors {
			t.Errorf("%s values: lint error: %v", name, err)
		}
	}
}

// TestChartSchema: values.schema.json refuses wrong types, unknown keys at
// the top and inside, and values outside their enum; and it describes and
// types every value.
func TestChartSchema(t *testing.T) {
	for name, y := range map[string]string{
		"wrong type":                "fetchConcurrency: many",
		"no downloads at all":       "maxDownloads: 0",
		"unknown top-level key":     "replicaCount: 2",
		"unknown nested key":        "store: {hostPath: /var/lib/csi-composefs, maxSize: \"0\", gcInterval: 10m, verifyInterval: 24h, size: 1G}",
		"unquoted off is a boolean": "minVerity: off",
		"unknown verity mode":       "minVerity: sometimes",
		"unknown registration mode": "registration: {mode: kubelet}",
		"relative kubeletDir":       "kubeletDir: var/lib/kubelet",
		"driver name with a slash":  "driverName: a/b",
		"allowed source with comma": "allowedSources: [\"https://a.example.com/,https://b.example.com/\"]",
		"size with a unit word":     "store: {hostPath: /x, maxSize: 20GB, gcInterval: 10m, verifyInterval: 24h}",
		"duration without unit":     "store: {hostPath: /x, maxSize: \"0\", gcInterval: \"10\", verifyInterval: 24h}",
		"bad digest":                "image: {repository: r, tag: \"\", digest: sha256:abc, pullPolicy: Always}",
		"relative extra object dir": "extraObjectDirs: [objects]",
		"zero port":                 "metrics: {port: 0}",
		"trust key not PEM":         "trustPolicy: {sources: [{prefix: https://a.example.com, keys: [{publicKey: abc}]}]}",
		"trust rule without prefix": "trustPolicy: {sources: [{requireSignature: true}]}",
		"trust poll interval 0":     "trustPolicy: {sources: [], pollInterval: \"0\"}",
		"mirror not a URL":          "registryMirrors: {docker.io: [mirror.example.com]}",
		"mirror not a list":         "registryMirrors: {docker.io: https://mirror.example.com}",
		"empty mirror list":         "registryMirrors: {docker.io: []}",
		"mirror of a URL":           "registryMirrors: {\"https://docker.io\": [https://mirror.example.com]}",
	} {
		if _, err := render(t, values(t, y), renderOpts{}); err == nil {
			t.Errorf("%s (%s): rendered", name, y)
		} else if !strings.Contains(err.Error(), "schema") {
			t.Errorf("%s: %v, want a schema error", name, err)
		}
	}
	// Every property in the schema has a type and a description.
	raw, err := os.ReadFile(filepath.Join(chartDir, "values.schema.json"))
	if err != nil {
		t.Fatal(err)
	}
	var s map[string]any
	if err := stdjson.Unmarshal(raw, &s); err != nil {
		t.Fatal(err)
	}
	if s["additionalProperties"] != false {
		t.Error("the schema allows unknown top-level keys")
	}
	var walk func(path string, node map[string]any)
	walk = func(path string, node map[string]any) {
		props, _ := node["properties"].(map[string]any)
		for k, v := range props {
			p := v.(map[string]any)
			if _, ok := p["type"]; !ok {
				t.Errorf("%s.%s has no type", path, k)
			}
			if d, _ := p["description"].(string); d == "" {
				t.Errorf("%s.%s has no description", path, k)
			}
			walk(path+"."+k, p)
		}
	}
	walk("values", s)
	// And every value in values.yaml is in the schema (the schema refuses
	// unknown keys, so rendering the defaults proves it).
	mustRender(t, nil, renderOpts{})
}

// TestChartMatchesKustomize: for default values the chart renders exactly
// the objects of the kustomize base (Helm's own labels aside).
func TestChartMatchesKustomize(t *testing.T) {
	chart := mustRender(t, nil, renderOpts{}).objects
	kust := kustomizeBuild(t)
	norm := func(objs []object) map[string]map[string]any {
		out := map[string]map[string]any{}
		for _, o := range objs {
			m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(o.obj)
			if err != nil {
				t.Fatal(err)
			}
			if md, ok := m["metadata"].(map[string]any); ok {
				if l, ok := md["labels"].(map[string]any); ok {
					delete(l, "helm.sh/chart")
					delete(l, "app.kubernetes.io/managed-by")
				}
			}
			out[o.key()] = m
		}
		return out
	}
	c, k := norm(chart), norm(kust)
	if !reflect.DeepEqual(c, k) {
		t.Errorf("chart (default values) and kustomize base differ (-chart +kustomize):\n%s", cmp.Diff(c, k))
	}
	if len(c) != 5 {
		t.Errorf("%d objects (%s), want CSIDriver, ServiceAccount, ClusterRole, ClusterRoleBinding, DaemonSet", len(c), keys(chart))
	}
}

// TestKustomizeFilesDecode: every manifest under deploy/kubernetes (the
// base's resources and the examples) decodes strictly.
func TestKustomizeFilesDecode(t *testing.T) {
	n := 0
	for _, f := range yamlFiles(t, kustomDir) {
		if filepath.Base(f) == "kustomization.yaml" {
			continue // kustomize's own type: built in TestChartMatchesKustomize
		}
		if inComponent(t, f) {
			continue // a component's input, built in TestTrustPolicyOverlay
		}
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if objs := decodeAll(t, f, data); len(objs) == 0 {
			t.Errorf("%s holds no object", f)
		} else {
			n += len(objs)
		}
	}
	if n < 10 {
		t.Errorf("only %d objects under %s", n, kustomDir)
	}
}

// TestCSIDriver: the fields kubelet relies on, for default and non-default
// values.
func TestCSIDriver(t *testing.T) {
	d := only[*storagev1.CSIDriver](t, mustRender(t, nil, renderOpts{}).objects)
	s := d.Spec
	if d.Name != "composefs.csi.dev" || s.AttachRequired == nil || *s.AttachRequired || s.PodInfoOnMount == nil || !*s.PodInfoOnMount ||
		s.FSGroupPolicy == nil || *s.FSGroupPolicy != storagev1.NoneFSGroupPolicy || s.RequiresRepublish == nil || *s.RequiresRepublish ||
		!reflect.DeepEqual(s.VolumeLifecycleModes, []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecyclePersistent, storagev1.VolumeLifecycleEphemeral}) ||
		(s.SELinuxMount != nil && *s.SELinuxMount) {
		t.Errorf("default CSIDriver: %s %+v", d.Name, s)
	}
	if _, ok := d.Labels["security.openshift.io/csi-ephemeral-volume-profile"]; ok {
		t.Error("OpenShift label set by default")
	}
	d = only[*storagev1.CSIDriver](t, mustRender(t, values(t, nonDefault), renderOpts{}).objects)
	s = d.Spec
	if d.Name != "composefs.example.com" ||
		!reflect.DeepEqual(s.VolumeLifecycleModes, []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecyclePersistent}) ||
		s.SELinuxMount == nil || !*s.SELinuxMount || d.Labels["security.openshift.io/csi-ephemeral-volume-profile"] != "restricted" {
		t.Errorf("non-default CSIDriver: %s %v %+v", d.Name, d.Labels, s)
	}
}

// TestRBAC: the service account may create and patch events, nothing else.
func TestRBAC(t *testing.T) {
	for name, vals := range map[string]map[string]any{"default": nil, "non-default": values(t, nonDefault)} {
		objs := mustRender(t, vals, renderOpts{}).objects
		sa := only[*corev1.ServiceAccount](t, objs)
		role := only[*rbacv1.ClusterRole](t, objs)
		b := only[*rbacv1.ClusterRoleBinding](t, objs)
		ds := only[*appsv1.DaemonSet](t, objs)
		want := []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create", "patch"}}}
		if !reflect.DeepEqual(role.Rules, want) {
			t.Errorf("%s: rules %+v, want %+v", name, role.Rules, want)
		}
		if b.RoleRef.Name != role.Name || b.RoleRef.Kind != "ClusterRole" || len(b.Subjects) != 1 ||
			b.Subjects[0].Kind != "ServiceAccount" || b.Subjects[0].Name != sa.Name || b.Subjects[0].Namespace != sa.Namespace {
			t.Errorf("%s: binding %+v does not bind %s/%s to %s", name, b, sa.Namespace, sa.Name, role.Name)
		}
		if ds.Spec.Template.Spec.ServiceAccountName != sa.Name || ds.Namespace != sa.Namespace {
			t.Errorf("%s: the DaemonSet runs as %q, the chart makes %s/%s", name, ds.Spec.Template.Spec.ServiceAccountName, sa.Namespace, sa.Name)
		}
	}
	objs := mustRender(t, values(t, "serviceAccount: {create: false, name: existing}\nrbac: {create: false}"), renderOpts{}).objects
	if len(find[*corev1.ServiceAccount](objs))+len(find[*rbacv1.ClusterRole](objs))+len(find[*rbacv1.ClusterRoleBinding](objs)) != 0 {
		t.Errorf("create: false still renders RBAC objects: %s", keys(objs))
	}
	if ds := only[*appsv1.DaemonSet](t, objs); ds.Spec.Template.Spec.ServiceAccountName != "existing" {
		t.Errorf("serviceAccount.name ignored: %q", ds.Spec.Template.Spec.ServiceAccountName)
	}
}

// TestServiceMonitor: a Service and a ServiceMonitor only when the cluster
// serves monitoring.coreos.com/v1; they select the plugin pods' metrics port.
func TestServiceMonitor(t *testing.T) {
	if objs := mustRender(t, nil, renderOpts{}).objects; len(find[*monitoringv1.ServiceMonitor](objs))+len(find[*corev1.Service](objs)) != 0 {
		t.Errorf("ServiceMonitor without the API: %s", keys(objs))
	}
	if objs := mustRender(t, values(t, "metrics: {port: 9810, serviceMonitor: {enabled: false}}"), renderOpts{apiVersions: []string{"monitoring.coreos.com/v1"}}).objects; len(find[*monitoringv1.ServiceMonitor](objs)) != 0 {
		t.Error("ServiceMonitor although disabled")
	}
	for name, vals := range map[string]map[string]any{"default": nil, "non-default": values(t, nonDefault)} {
		objs := mustRender(t, vals, renderOpts{apiVersions: []string{"monitoring.coreos.com/v1"}}).objects
		sm := only[*monitoringv1.ServiceMonitor](t, objs)
		svc := only[*corev1.Service](t, objs)
		ds := only[*appsv1.DaemonSet](t, objs)
		if !labels.SelectorFromSet(sm.Spec.Selector.MatchLabels).Matches(labels.Set(svc.Labels)) ||
			!labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(ds.Spec.Template.Labels)) {
			t.Errorf("%s: ServiceMonitor %v → Service %v → pods %v do not select each other", name, sm.Spec.Selector.MatchLabels, svc.Labels, ds.Spec.Template.Labels)
		}
		port := containerPort(t, ds, "csi-composefs", "metrics")
		if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "metrics" || sm.Spec.Endpoints[0].Path != "/metrics" ||
			len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Name != "metrics" || svc.Spec.Ports[0].Port != port {
			t.Errorf("%s: endpoints %+v, service ports %+v, container port %d", name, sm.Spec.Endpoints, svc.Spec.Ports, port)
		}
	}
}

// TestNotes: NOTES.txt says how to check and try the install, and warns
// when any source is allowed.
func TestNotes(t *testing.T) {
	n := mustRender(t, nil, renderOpts{}).notes
	for _, want := range []string{"kubectl get csinode", "driver: composefs.csi.dev", "WARNING: allowedSources is empty"} {
		if !strings.Contains(n, want) {
			t.Errorf("default NOTES lack %q:\n%s", want, n)
		}
	}
	n = mustRender(t, values(t, nonDefault), renderOpts{}).notes
	if strings.Contains(n, "WARNING") || strings.Contains(n, "csi:") || !strings.Contains(n, "composefs.example.com") {
		t.Errorf("non-default NOTES (allow-list set, no inline volumes):\n%s", n)
	}
}

func containerPort(t *testing.T, ds *appsv1.DaemonSet, container, port string) int32 {
	t.Helper()
	c := containerOf(t, ds, container)
	for _, p := range c.Ports {
		if p.Name == port {
			return p.ContainerPort
		}
	}
	t.Fatalf("container %s has no port %s", container, port)
	return 0
}

func containerOf(t *testing.T, ds *appsv1.DaemonSet, name string) corev1.Container {
	t.Helper()
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("DaemonSet %s has no container %s", ds.Name, name)
	return corev1.Container{}
}
