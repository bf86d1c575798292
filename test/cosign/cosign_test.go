package cosign

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/internal/testoci"
	"github.com/csi-composefs/csi-composefs/internal/testrepo"
	"github.com/csi-composefs/csi-composefs/internal/testsign"
	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/driver"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
	"github.com/csi-composefs/csi-composefs/pkg/trust"
)

// The cosign CLI, built once from the module this go.mod pins.
var built struct {
	once     sync.Once
	dir, bin string
	err      error
}

func cosignBinary(t *testing.T) string {
	t.Helper()
	built.once.Do(func() {
		if built.dir, built.err = os.MkdirTemp("", "cosign-"); built.err != nil {
			return
		}
		built.bin = filepath.Join(built.dir, "cosign")
		cmd := exec.Command("go", "build", "-o", built.bin, "github.com/sigstore/cosign/v2/cmd/cosign")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			built.err = fmt.Errorf("%v\n%s", err, out)
		}
	})
	if built.err != nil {
		t.Skipf("the cosign CLI cannot be built here (its module is not reachable?): %v", built.err)
	}
	return built.bin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

// cosign runs the CLI offline: no transparency log, no TUF, no prompt.
type cosign struct {
	t   *testing.T
	bin string
	dir string
}

func (c cosign) run(args ...string) string {
	c.t.Helper()
	out, err := c.try(args...)
	if err != nil {
		c.t.Fatalf("cosign %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (c cosign) try(args ...string) (string, error) {
	cmd := exec.Command(c.bin, args...)
	cmd.Dir = c.dir
	cmd.Env = append(os.Environ(), "COSIGN_PASSWORD=test", "COSIGN_YES=true", "TUF_ROOT="+filepath.Join(c.dir, "tuf"), "HOME="+c.dir)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// keyPair makes a key pair with cosign generate-key-pair and returns the
// private key's path and the public key.
func (c cosign) keyPair(name string) (string, string) {
	c.t.Helper()
	c.run("generate-key-pair", "--output-key-prefix", name)
	pub, err := os.ReadFile(filepath.Join(c.dir, name+".pub"))
	if err != nil {
		c.t.Fatal(err)
	}
	return filepath.Join(c.dir, name+".key"), string(pub)
}

func policy(prefix string, pubs ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "sources:\n- prefix: %s\n  requireSignature: true\n  keys:\n", prefix)
	for i, p := range pubs {
		fmt.Fprintf(&b, "  - name: key-%d\n    publicKey: |\n", i)
		for _, l := range strings.Split(strings.TrimSpace(p), "\n") {
			fmt.Fprintf(&b, "      %s\n", l)
		}
	}
	return b.String()
}

// node is the driver over a fresh store with a trust policy.
type node struct {
	t      *testing.T
	d      *driver.Driver
	policy string
	w      *trust.Watcher
	n      int
}

func newNode(t *testing.T, policyText string, insecure ...string) *node {
	t.Helper()
	ctx := klog.NewContext(context.Background(), klog.Background())
	st, err := fetch.Open(ctx, t.TempDir(), fetch.Options{Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	n := &node{t: t, policy: filepath.Join(t.TempDir(), "policy.yaml")}
	if err := os.WriteFile(n.policy, []byte(policyText), 0o644); err != nil {
		t.Fatal(err)
	}
	if n.w, err = trust.NewWatcher(n.policy); err != nil {
		t.Fatal(err)
	}
	n.d, err = driver.New(driver.Config{NodeID: "n", Registries: driver.RegistryConfig{Insecure: insecure}}, st, driver.WithTrustPolicy(n.w))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.d.Close)
	if err := n.d.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	return n
}

// publish publishes a volume and returns its target.
func (n *node) publish(vc map[string]string) (string, error) {
	n.n++
	target := filepath.Join(n.t.TempDir(), "vol")
	n.t.Cleanup(func() {
		for {
			if _, m, _ := cfs.IsMounted(target); !m || cfs.Unmount(target, true) != nil {
				return
			}
		}
	})
	_, err := n.d.NodePublishVolume(context.Background(), &csi.NodePublishVolumeRequest{
		VolumeId: fmt.Sprintf("v%d", n.n), TargetPath: target, VolumeContext: vc, Readonly: true,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY},
		},
	})
	return target, err
}

func needRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts composefs images: needs root")
	}
}

func denied(t *testing.T, what string, err error, want string) {
	t.Helper()
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), want) {
		t.Errorf("%s: %v, want PermissionDenied naming %q", what, err, want)
	} else {
		t.Logf("%s: %v", what, err)
	}
}

// HTTP repositories signed with cosign sign-blob.
func TestCosignSignBlob(t *testing.T) {
	needRoot(t)
	c := cosign{t: t, bin: cosignBinary(t), dir: t.TempDir()}
	key, pub := c.keyPair("cosign")
	_, otherPub := c.keyPair("other")
	repo := t.TempDir()
	for i, name := range []string{"app", "bundled", "truncated", "other-digest", "swapped"} {
		testrepo.Publish(t, repo, name, map[string]string{"etc/version": name + "\n", "lib/big": strings.Repeat(fmt.Sprint(i), 8192)})
	}
	img := func(name string) string { return filepath.Join(repo, "images", name) }
	c.run("sign-blob", "--key", key, "--tlog-upload=false", "--output-signature", img("app")+".sig", img("app"))
	c.run("sign-blob", "--key", key, "--tlog-upload=false", "--bundle", img("bundled")+".bundle", img("bundled"))
	c.run("sign-blob", "--key", key, "--tlog-upload=false", "--output-signature", img("truncated")+".sig", img("truncated"))
	sig, _ := os.ReadFile(img("truncated") + ".sig")
	os.WriteFile(img("truncated")+".sig", sig[:len(sig)/2], 0o644)
	appSig, _ := os.ReadFile(img("app") + ".sig")
	os.WriteFile(img("other-digest")+".sig", appSig, 0o644)
	c.run("sign-blob", "--key", key, "--tlog-upload=false", "--output-signature", img("swapped")+".sig", img("swapped"))
	testrepo.Publish(t, repo, "swapped", map[string]string{"etc/version": "swapped after signing\n"})
	srv := httptest.NewServer(http.FileServer(http.Dir(repo)))
	defer srv.Close()

	n := newNode(t, policy(srv.URL, pub))
	for _, name := range []string{"app", "bundled"} {
		target, err := n.publish(map[string]string{"repository": srv.URL, "image": name})
		if err != nil {
			t.Fatalf("%s, signed by cosign: %v", name, err)
		}
		if b, _ := os.ReadFile(filepath.Join(target, "etc/version")); string(b) != name+"\n" {
			t.Fatalf("%s: the volume reads %q", name, b)
		}
	}
	for _, name := range []string{"truncated", "other-digest", "swapped"} {
		_, err := n.publish(map[string]string{"repository": srv.URL, "image": name})
		denied(t, name, err, "does not verify")
	}
	wrong := newNode(t, policy(srv.URL, otherPub))
	_, err := wrong.publish(map[string]string{"repository": srv.URL, "image": "app"})
	denied(t, "another key", err, "does not verify")
}

// Registries signed with cosign sign --key.
func TestCosignSign(t *testing.T) {
	needRoot(t)
	c := cosign{t: t, bin: cosignBinary(t), dir: t.TempDir()}
	key, pub := c.keyPair("cosign")
	_, otherPub := c.keyPair("other")
	reg := testoci.NewRegistry(t, testoci.Options{})
	repoName := reg.Host + "/team/app"
	r := testsign.Repository(t, reg.Host, "team/app")
	push := func(tag, content string) string {
		t.Helper()
		src := t.TempDir()
		if err := os.MkdirAll(filepath.Join(src, "etc"), 0o755); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(src, "etc/version"), []byte(content+"\n"), 0o644)
		os.WriteFile(filepath.Join(src, "big"), []byte(strings.Repeat(content, 8192)), 0o644)
		ref, err := oci.ParseReference("oci://" + repoName + ":" + tag)
		if err != nil {
			t.Fatal(err)
		}
		cl, err := oci.NewClient(ref, oci.Options{Insecure: []string{reg.Host}})
		if err != nil {
			t.Fatal(err)
		}
		in, err := oci.InputFromDir(context.Background(), src, cfs.DirOptions{}, cfs.DefaultWriteOptions())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := oci.Push(context.Background(), cl, in, oci.PushOptions{}); err != nil {
			t.Fatal(err)
		}
		return testsign.Manifest(t, r, tag).Digest.String()
	}
	m1 := push("v1", "one")
	c.run("sign", "--key", key, "--tlog-upload=false", "--allow-insecure-registry", "--allow-http-registry", repoName+"@"+m1)
	push("unsigned", "unsigned")

	n := newNode(t, policy("oci://"+reg.Host+"/team", pub), reg.Host)
	vc := func(tag string) map[string]string {
		return map[string]string{"image": "oci://" + repoName + ":" + tag, "pullPolicy": "Always"}
	}
	target, err := n.publish(vc("v1"))
	if err != nil {
		t.Fatalf("signed by cosign sign, by tag: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(target, "etc/version")); string(b) != "one\n" {
		t.Fatalf("v1: the volume reads %q", b)
	}
	_, err = n.publish(vc("unsigned"))
	denied(t, "unsigned", err, "not signed")
	wrong := newNode(t, policy("oci://"+reg.Host+"/team", otherPub), reg.Host)
	_, err = wrong.publish(vc("v1"))
	denied(t, "another key", err, "does not verify")
	// The sigstore bundle referrer of the new bundle format.
	m3 := push("bundled", "bundled")
	out, err := c.try("sign", "--key", key, "--tlog-upload=false", "--new-bundle-format", "--use-signing-config=false",
		"--allow-insecure-registry", "--allow-http-registry", repoName+"@"+m3)
	if err != nil {
		t.Logf("cosign sign --new-bundle-format does not sign offline here; the referrer is covered by the driver's tests: %v\n%s", err, out)
	} else {
		// Stored as a referrer, not under the signature tag: the node
		// found it through the referrers API.
		if _, err := r.Resolve(context.Background(), trust.SignatureTag(m3)); err == nil {
			t.Errorf("cosign --new-bundle-format wrote the %s tag; want only a referrer", trust.SignatureTag(m3))
		}
		if _, err := n.publish(vc("bundled")); err != nil {
			t.Errorf("signed by cosign sign --new-bundle-format: %v", err)
		}
	}
	// The tag moves to content signed by no one: refused.
	push("v1", "moved")
	_, err = n.publish(vc("v1"))
	denied(t, "v1 moved", err, "not signed")
}
