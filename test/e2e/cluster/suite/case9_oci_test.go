package suite

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ociRegistry is an OCI registry of the suite (go-containerregistry's, in
// this process) on an address the node reaches, with TLS (its own CA,
// given to volumes as ca.crt in their pull secret) and basic auth.
type ociRegistry struct {
	srv        *httptest.Server
	host       string
	caPEM      []byte
	caFile     string
	user, pass string
	passFile   string
}

func startOCIRegistry(t *testing.T) *ociRegistry {
	t.Helper()
	addr := getenv("E2E_REGISTRY_ADDR", "127.0.0.1:18443")
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("registry listener: %v", err)
	}
	r := &ociRegistry{user: "e2e", pass: "registry-" + time.Now().Format("150405.000")}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	r.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path != "/v2/" {
			if u, p, ok := req.BasicAuth(); !ok || u != r.user || p != r.pass {
				w.Header().Set("WWW-Authenticate", `Basic realm="e2e"`)
				http.Error(w, "unauthorized", http.StatusUnauthorized)
				return
			}
		}
		inner.ServeHTTP(w, req)
	}))
	r.srv.Listener.Close()
	r.srv.Listener = l
	r.srv.StartTLS()
	t.Cleanup(r.srv.Close)
	r.host = l.Addr().String()
	r.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.srv.Certificate().Raw})
	dir := t.TempDir()
	r.caFile, r.passFile = filepath.Join(dir, "ca.crt"), filepath.Join(dir, "password")
	if err := os.WriteFile(r.caFile, r.caPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(r.passFile, []byte(r.pass+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return r
}

// pullSecret creates the usual Kubernetes pull secret for the registry
// (with the password given) and its CA.
func (r *ociRegistry) pullSecret(t *testing.T, e *env, ns, name, pass string) {
	t.Helper()
	auth := base64.StdEncoding.EncodeToString([]byte(r.user + ":" + pass))
	cfg, _ := json.Marshal(map[string]any{"auths": map[string]any{r.host: map[string]string{"auth": auth}}})
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name}, Type: corev1.SecretTypeDockerConfigJson,
		Data: map[string][]byte{corev1.DockerConfigJsonKey: cfg, "ca.crt": r.caPEM}}
	if _, err := e.cs.CoreV1().Secrets(ns).Create(context.Background(), s, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// pushArtifact pushes tree dir as a composefs artifact with the CLI and
// returns the composefs digest it prints.
func (r *ociRegistry) pushArtifact(t *testing.T, e *env, dir, ref string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(e.cli, "image", "push", "--ca-file", r.caFile, "--username", r.user, "--password-file", r.passFile, dir, ref)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("csi-composefs image push %s: %v\n%s", ref, err, stderr.String())
	}
	f := strings.Fields(stdout.String())
	if len(f) != 2 || len(f[1]) != 64 {
		t.Fatalf("image push printed %q, want the manifest digest and the composefs digest", stdout.String())
	}
	return f[1]
}

// pushImage pushes tree dir as a one-layer container image with crane.
func (r *ociRegistry) pushImage(t *testing.T, dir, ref string) {
	t.Helper()
	layer := filepath.Join(t.TempDir(), "layer.tar")
	treeTar(t, dir, layer)
	img, err := crane.Append(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(r.caPEM)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	if err := crane.Push(img, ref, crane.WithTransport(tr), crane.WithAuth(&authn.Basic{Username: r.user, Password: r.pass})); err != nil {
		t.Fatal(err)
	}
}

// treeTar writes the tree under dir (folders, files, symlinks) as a tar at path.
func treeTar(t *testing.T, dir, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	err = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		link := ""
		if fi.Mode()&os.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return err
		}
		h.Name, h.Uid, h.Gid, h.Uname, h.Gname = filepath.ToSlash(rel), 0, 0, "", ""
		if fi.IsDir() {
			h.Name += "/"
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			_, err = tw.Write(b)
			return err
		}
		return nil
	})
	if err == nil {
		err = tw.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
}

// Case 9: OCI registries. A composefs artifact pushed with the CLI and a
// plain container image pushed with crane, both behind TLS and basic auth,
// are read by pods through inline volumes with a pull secret
// (.dockerconfigjson and ca.crt); every file matches. Wrong credentials
// leave the pod ContainerCreating with PermissionDenied and nothing
// mounted.
func TestCase9OCIRegistry(t *testing.T) {
	e := setup(t)
	ns := e.newNamespace(t)
	reg := startOCIRegistry(t)
	reg.pullSecret(t, e, ns, "regcred", reg.pass)
	reg.pullSecret(t, e, ns, "wrongcred", "not the password")

	art := sampleTree(t, 9)
	artRef := "oci://" + reg.host + "/e2e/app:v1"
	artDigest := reg.pushArtifact(t, e, art.dir, artRef)
	plain := sampleTree(t, 19)
	plainRef := reg.host + "/e2e/plain:1"
	reg.pushImage(t, plain.dir, plainRef)

	vol := func(attrs map[string]string, secret string) corev1.Volume {
		v := e.inlineVolume("data", attrs)
		v.CSI.NodePublishSecretRef = &corev1.LocalObjectReference{Name: secret}
		return v
	}
	e.createPod(t, ns, e.readerPod("artifact", vol(map[string]string{"image": artRef, "digest": artDigest}, "regcred")))
	e.createPod(t, ns, e.readerPod("plain", vol(map[string]string{"image": "docker://" + plainRef}, "regcred")))
	e.createPod(t, ns, e.readerPod("wrong", vol(map[string]string{"image": artRef, "digest": artDigest}, "wrongcred")))

	_, took := e.waitRunning(t, ns, "artifact", 3*time.Minute)
	files, n := e.verifyTree(t, ns, "artifact", "/data", art)
	report(t, "artifact %s: pod Running %s after create; %d files (%d bytes) match", artRef, took.Round(time.Millisecond), files, n)
	_, took = e.waitRunning(t, ns, "plain", 3*time.Minute)
	files, n = e.verifyTree(t, ns, "plain", "/data", plain)
	report(t, "container image docker://%s: pod Running %s after create; %d files (%d bytes) match", plainRef, took.Round(time.Millisecond), files, n)

	ev := e.waitEvent(t, ns, "wrong", 90*time.Second, "PermissionDenied")
	p, err := e.cs.CoreV1().Pods(ns).Get(context.Background(), "wrong", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !containerCreating(p) {
		t.Errorf("wrong credentials: pod is %s, want ContainerCreating", phase(p, nil))
	}
	if m := e.podMounts(t, string(p.UID)); len(m) > 0 {
		t.Errorf("wrong credentials: mounted on the node: %v", m)
	}
	report(t, "wrong credentials: event %s: %q; nothing mounted", ev.Reason, ev.Message)
}
