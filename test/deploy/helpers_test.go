package deploy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// Paths of what users install, from this module's directory.
var (
	repoRoot  = filepath.Join("..", "..")
	chartDir  = filepath.Join(repoRoot, "charts", "csi-composefs")
	kustomDir = filepath.Join(repoRoot, "deploy", "kubernetes")
)

// The release the chart is rendered as: the names and namespace the
// kustomize base uses.
const (
	releaseName      = "csi-composefs"
	releaseNamespace = "kube-system"
)

// scheme knows every kind the manifests may hold: client-go's and the
// Prometheus Operator's ServiceMonitor.
var scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := monitoringv1.AddToScheme(s); err != nil {
		panic(err)
	}
	return s
}()

// strict decodes JSON or YAML into typed objects; unknown and duplicate
// fields are errors.
var strict = json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme, scheme,
	json.SerializerOptions{Yaml: true, Strict: true})

// object is one decoded manifest.
type object struct {
	gvk schema.GroupVersionKind
	obj runtime.Object
	raw []byte
}

// key names an object uniquely in a set.
func (o object) key() string {
	m, _ := runtime.DefaultUnstructuredConverter.ToUnstructured(o.obj)
	md, _ := m["metadata"].(map[string]any)
	return fmt.Sprintf("%s/%s/%v/%v", o.gvk.GroupVersion(), o.gvk.Kind, md["namespace"], md["name"])
}

// decodeAll splits a multi-document YAML stream and decodes every document
// strictly. what names the stream in errors.
func decodeAll(t *testing.T, what string, data []byte) []object {
	t.Helper()
	var out []object
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for i := 0; ; i++ {
		doc, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("%s: document %d: %v", what, i, err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, gvk, err := strict.Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("%s: document %d does not decode strictly: %v\n%s", what, i, err, doc)
		}
		out = append(out, object{gvk: *gvk, obj: obj, raw: doc})
	}
	return out
}

func stripComments(doc []byte) []byte {
	var b bytes.Buffer
	for _, l := range strings.Split(string(doc), "\n") {
		if t := strings.TrimSpace(l); t != "" && !strings.HasPrefix(t, "#") && t != "---" {
			b.WriteString(l + "\n")
		}
	}
	return b.Bytes()
}

// rendered is a chart rendered for some values.
type rendered struct {
	objects []object
	notes   string
}

// renderOpts are the cluster the chart is rendered for.
type renderOpts struct {
	apiVersions []string // extra API versions the cluster serves
}

// render renders the chart as `helm install --dry-run` does on the client:
// values are checked against values.schema.json.
func render(t *testing.T, vals map[string]any, o renderOpts) (rendered, error) {
	t.Helper()
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("loading the chart: %v", err)
	}
	inst := action.NewInstall(&action.Configuration{})
	inst.ClientOnly, inst.DryRun, inst.DryRunOption = true, true, "client"
	inst.ReleaseName, inst.Namespace = releaseName, releaseNamespace
	inst.KubeVersion = &chartutil.KubeVersion{Version: "v1.37.2", Major: "1", Minor: "37"}
	inst.APIVersions = o.apiVersions // added to Helm's defaults
	rel, err := inst.Run(ch, vals)
	if err != nil {
		return rendered{}, err
	}
	return rendered{objects: decodeAll(t, "the rendered chart", []byte(rel.Manifest)), notes: rel.Info.Notes}, nil
}

func mustRender(t *testing.T, vals map[string]any, o renderOpts) rendered {
	t.Helper()
	r, err := render(t, vals, o)
	if err != nil {
		t.Fatalf("rendering the chart: %v", err)
	}
	return r
}

// kustomizeBuild builds deploy/kubernetes as `kubectl apply -k` would.
func kustomizeBuild(t *testing.T) []object {
	t.Helper()
	res, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), kustomDir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", kustomDir, err)
	}
	y, err := res.AsYaml()
	if err != nil {
		t.Fatal(err)
	}
	return decodeAll(t, "kustomize build", y)
}

// find returns the objects of type T.
func find[T runtime.Object](objs []object) []T {
	var out []T
	for _, o := range objs {
		if v, ok := o.obj.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

// only returns the one object of type T.
func only[T runtime.Object](t *testing.T, objs []object) T {
	t.Helper()
	all := find[T](objs)
	if len(all) != 1 {
		var zero T
		t.Fatalf("%d objects of type %T, want 1 (have %s)", len(all), zero, keys(objs))
	}
	return all[0]
}

func keys(objs []object) string {
	var k []string
	for _, o := range objs {
		k = append(k, o.key())
	}
	sort.Strings(k)
	return strings.Join(k, ", ")
}

// yamlFiles lists the *.yaml files under dir.
func yamlFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			out = append(out, p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// values parses YAML values as `helm install -f` would.
func values(t *testing.T, y string) map[string]any {
	t.Helper()
	m := map[string]any{}
	if err := yaml.Unmarshal([]byte(y), &m); err != nil {
		t.Fatal(err)
	}
	return m
}
