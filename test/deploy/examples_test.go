package deploy

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	"github.com/csi-composefs/csi-composefs/pkg/driver"
)

// TestExamples: every example decodes strictly, names the default driver,
// has volume attributes and secrets the plugin accepts (its own parsers),
// is read-only, and refers only to claims, volumes and secrets it defines.
func TestExamples(t *testing.T) {
	var files []string
	for _, f := range yamlFiles(t, filepath.Join(kustomDir, "examples")) {
		if !inComponent(t, f) {
			files = append(files, f)
		}
	}
	if len(files) < 4 {
		t.Fatalf("%d example files, want inline, static PV, shared PV and private repository", len(files))
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		objs := decodeAll(t, f, data)
		secrets := map[string]*corev1.Secret{}
		for _, s := range find[*corev1.Secret](objs) {
			secrets[s.Name] = s
		}
		claims := map[string]*corev1.PersistentVolumeClaim{}
		for _, c := range find[*corev1.PersistentVolumeClaim](objs) {
			claims[c.Name] = c
		}
		pvs := map[string]*corev1.PersistentVolume{}
		checkCSI := func(where string, driverName string, readOnly bool, attrs map[string]string, secret *corev1.SecretReference) {
			t.Helper()
			if driverName != driver.DefaultDriverName || !readOnly {
				t.Errorf("%s: %s: driver %q read-only %v, want %s read-only", f, where, driverName, readOnly, driver.DefaultDriverName)
			}
			if _, err := driver.ParseVolumeContext(attrs); err != nil {
				t.Errorf("%s: %s: the plugin refuses the attributes: %v", f, where, err)
			}
			if secret == nil {
				return
			}
			s, ok := secrets[secret.Name]
			if !ok {
				t.Errorf("%s: %s: secret %s is not in the file", f, where, secret.Name)
				return
			}
			data := map[string]string{}
			for k, v := range s.StringData {
				data[k] = v
			}
			for k, v := range s.Data {
				data[k] = string(v)
			}
			if _, err := driver.ParseSecrets(data); err != nil {
				t.Errorf("%s: %s: the plugin refuses secret %s: %v", f, where, s.Name, err)
			}
		}
		for _, pv := range find[*corev1.PersistentVolume](objs) {
			pvs[pv.Name] = pv
			c := pv.Spec.CSI
			if c == nil {
				t.Errorf("%s: PV %s is not a CSI volume", f, pv.Name)
				continue
			}
			if len(pv.Spec.AccessModes) != 1 || pv.Spec.AccessModes[0] != corev1.ReadOnlyMany || c.VolumeHandle == c.VolumeAttributes["digest"] {
				t.Errorf("%s: PV %s: access modes %v, handle %q (want ReadOnlyMany and a handle that is not the digest)", f, pv.Name, pv.Spec.AccessModes, c.VolumeHandle)
			}
			checkCSI("PV "+pv.Name, c.Driver, c.ReadOnly, c.VolumeAttributes, c.NodePublishSecretRef)
		}
		for _, c := range claims {
			if pvs[c.Spec.VolumeName] == nil || c.Spec.StorageClassName == nil || *c.Spec.StorageClassName != "" {
				t.Errorf("%s: claim %s binds to %q (storage class %v); want a PV of the file, static binding", f, c.Name, c.Spec.VolumeName, c.Spec.StorageClassName)
			}
		}
		for _, pod := range find[*corev1.Pod](objs) {
			for _, v := range pod.Spec.Volumes {
				switch {
				case v.CSI != nil:
					var ref *corev1.SecretReference
					if v.CSI.NodePublishSecretRef != nil {
						ref = &corev1.SecretReference{Name: v.CSI.NodePublishSecretRef.Name}
					}
					checkCSI("pod "+pod.Name+" volume "+v.Name, v.CSI.Driver, v.CSI.ReadOnly != nil && *v.CSI.ReadOnly, v.CSI.VolumeAttributes, ref)
				case v.PersistentVolumeClaim != nil:
					if claims[v.PersistentVolumeClaim.ClaimName] == nil || !v.PersistentVolumeClaim.ReadOnly {
						t.Errorf("%s: pod %s: claim %s is not in the file or not read-only", f, pod.Name, v.PersistentVolumeClaim.ClaimName)
					}
				}
			}
			for _, c := range pod.Spec.Containers {
				for _, m := range c.VolumeMounts {
					if !m.ReadOnly {
						t.Errorf("%s: pod %s mounts %s writable", f, pod.Name, m.Name)
					}
				}
			}
		}
	}
}

// TestKustomizeOverlay: the overlay the examples README shows builds on the
// base, and the plugin's serve command accepts the arguments it adds.
func TestKustomizeOverlay(t *testing.T) {
	ds := only[*appsv1.DaemonSet](t, readmeOverlay(t, "# kustomization.yaml of your overlay", nil))
	c := containerOf(t, ds, "csi-composefs")
	cfg := parseServe(t, c)
	if got := strings.Join(cfg.Driver.AllowedSources, " "); got != "https://repo.example.com/apps/" {
		t.Errorf("allowed sources %q after the overlay", got)
	}
	if !strings.HasSuffix(c.Image, ":v0.1.0") {
		t.Errorf("image %s", c.Image)
	}
}

// readmeOverlay builds the overlay kustomization the examples README shows
// in the yaml block starting with header, in a temporary directory: its
// base is this checkout's, and each line "- NAME" for NAME in dirs becomes
// that directory (a component the README says to copy).
func readmeOverlay(t *testing.T, header string, dirs map[string]string) []object {
	t.Helper()
	readme, err := os.ReadFile(filepath.Join(kustomDir, "examples", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, block, ok := strings.Cut(string(readme), "```yaml\n"+header+"\n")
	block, _, ok2 := strings.Cut(block, "```")
	if !ok || !ok2 {
		t.Fatalf("the examples README has no overlay kustomization %q", header)
	}
	dir := t.TempDir()
	rel := func(p string) string {
		abs, err := filepath.Abs(p)
		if err != nil {
			t.Fatal(err)
		}
		r, err := filepath.Rel(dir, abs) // kustomize takes relative bases only
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	var lines []string
	for _, l := range strings.Split(block, "\n") {
		item, isItem := strings.CutPrefix(strings.TrimSpace(l), "- ")
		item, _, _ = strings.Cut(item, " ")
		switch {
		case isItem && strings.Contains(item, "deploy/kubernetes"):
			l = "  - " + rel(kustomDir) // the README's path is relative to the reader's checkout
		case isItem && dirs[item] != "":
			l = "  - " + rel(dirs[item])
		}
		lines = append(lines, l)
	}
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(strings.Join(lines, "\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("building the README's overlay %q: %v", header, err)
	}
	y, err := res.AsYaml()
	if err != nil {
		t.Fatal(err)
	}
	return decodeAll(t, "the overlay "+header, y)
}

// inComponent reports whether f is in the directory of a kustomize
// component (its kustomization and the files it generates objects from),
// which TestTrustPolicyOverlay builds.
func inComponent(t *testing.T, f string) bool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(filepath.Dir(f), "kustomization.yaml"))
	if errors.Is(err, fs.ErrNotExist) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(b), "\nkind: Component\n")
}
