package node

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/internal/testsign"
	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// configMapDir writes files the way the kubelet writes a ConfigMap volume:
// a timestamped directory, the ..data symlink swapped atomically to it, and
// each file a symlink through ..data.
type configMapDir struct {
	t   *testing.T
	dir string
	gen int
}

func (c *configMapDir) write(name, content string) {
	c.t.Helper()
	c.gen++
	ts := fmt.Sprintf("..2026_12_01_00_00_%02d.%d", c.gen, c.gen)
	if err := os.Mkdir(filepath.Join(c.dir, ts), 0o755); err != nil {
		c.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(c.dir, ts, name), []byte(content), 0o644); err != nil {
		c.t.Fatal(err)
	}
	tmp := filepath.Join(c.dir, "..data_tmp")
	if err := os.Symlink(ts, tmp); err != nil {
		c.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(c.dir, "..data")); err != nil {
		c.t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(c.dir, name)); os.IsNotExist(err) {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(c.dir, name)); err != nil {
			c.t.Fatal(err)
		}
	}
}

// TestSignatures runs the plugin with a trust policy in a ConfigMap-like
// directory: a signed image is published by name, an unsigned one refused
// with PermissionDenied; the policy is edited while the plugin runs (a bad
// edit keeps the last good policy; a good one takes effect without a
// restart); a signature verified before a restart still counts after it,
// offline (pullPolicy Never), while its key stays in the policy; a plugin
// given a policy that does not parse does not start.
func TestSignatures(t *testing.T) {
	requirePluginRun(t)
	r := newRepo(t)
	key := testsign.NewKey(t)
	signed := r.publish(t, "signed", imageFiles(1))
	r.publish(t, "unsigned", imageFiles(2))
	img, err := os.ReadFile(filepath.Join(r.dir, "images", "signed"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(r.dir, "images", "signed.sig"), key.SignBlob(t, img), 0o644); err != nil {
		t.Fatal(err)
	}
	cm := &configMapDir{t: t, dir: t.TempDir()}
	cm.write("policy.yaml", testsign.Policy(r.srv.URL, true, key))
	policy := filepath.Join(cm.dir, "policy.yaml")

	bin := buildBinary(t)
	e := &env{t: t, bin: bin, dir: t.TempDir(), allowed: r.srv.URL + "/",
		flags: []string{"--trust-policy", policy, "--trust-policy-poll", "100ms"}}
	e.store = filepath.Join(e.dir, "store")
	e.sock = filepath.Join(e.dir, "csi.sock")
	p := e.start()
	pods := t.TempDir()
	n := 0
	// publish publishes image on a new target; attrs are more volume
	// attributes, name and value.
	publish := func(image string, attrs ...string) error {
		n++
		target := filepath.Join(pods, fmt.Sprintf("pod-%02d", n), "vol")
		t.Cleanup(func() {
			for {
				if _, m, _ := cfs.IsMounted(target); !m || cfs.Unmount(target, true) != nil {
					break
				}
			}
		})
		vc := map[string]string{"repository": r.srv.URL, "image": image}
		for i := 0; i+1 < len(attrs); i += 2 {
			vc[attrs[i]] = attrs[i+1]
		}
		_, err := p.node.NodePublishVolume(context.Background(), publishReq(fmt.Sprintf("v%d", n), target, vc))
		if err == nil {
			checkFiles(t, target, imageFiles(map[string]int{"signed": 1, "unsigned": 2}[image]))
		}
		return err
	}
	if err := publish("signed"); err != nil {
		t.Fatalf("signed image by name: %v", err)
	}
	if err := publish("unsigned"); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "not signed") {
		t.Fatalf("unsigned image: %v, want PermissionDenied", err)
	}

	// A bad edit: logged, and the last good policy stays.
	cm.write("policy.yaml", "sources: [{prefix: "+r.srv.URL+", requireSignature: true}]\n")
	log := filepath.Join(e.dir, "plugin-1.log")
	waitFor(t, "the bad policy to be seen", func() bool {
		b, _ := os.ReadFile(log)
		return strings.Contains(string(b), "Trust policy not reloaded")
	})
	if err := publish("unsigned"); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("unsigned image after a bad edit: %v, want PermissionDenied (the last good policy)", err)
	}
	// A good edit takes effect while the plugin runs.
	cm.write("policy.yaml", testsign.Policy(r.srv.URL, false, key))
	waitFor(t, "the new policy to take effect", func() bool {
		err := publish("unsigned")
		if err != nil && status.Code(err) != codes.PermissionDenied {
			t.Fatalf("unsigned image: %v", err)
		}
		return err == nil
	})

	// A restart: what this node verified is verified again from the
	// signature kept in its store, offline, against the policy in force.
	p.kill()
	cm.write("policy.yaml", testsign.Policy(r.srv.URL, true, key))
	p = e.start()
	first := filepath.Join(pods, "pod-01", "vol")
	if _, err := p.node.NodePublishVolume(context.Background(), publishReq("v1", first, map[string]string{"repository": r.srv.URL, "image": "signed"})); err != nil {
		t.Fatalf("repeating the publish of a volume published before the restart: %v", err)
	}
	checkFiles(t, first, imageFiles(1))
	never := func() error { return publish("signed", "digest", signed.String(), "pullPolicy", "Never") }
	if err := never(); err != nil {
		t.Fatalf("signed image, pullPolicy Never, after a restart: %v, want it published (its signature was verified before the restart)", err)
	}
	if err := publish("unsigned", "pullPolicy", "Never"); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("unsigned image, pullPolicy Never, after a restart: %v, want FailedPrecondition (no signature kept)", err)
	}
	// The key leaves the policy: its signature no longer counts.
	other := testsign.NewKey(t)
	cm.write("policy.yaml", testsign.Policy(r.srv.URL, true, other))
	waitFor(t, "the key's removal to take effect", func() bool {
		err := never()
		if err != nil && status.Code(err) != codes.PermissionDenied {
			t.Fatalf("signed image, pullPolicy Never, its key removed from the policy: %v, want PermissionDenied", err)
		}
		return err != nil
	})
	// A rule that no longer requires a signature does not ask for one.
	cm.write("policy.yaml", testsign.Policy(r.srv.URL, false, other))
	waitFor(t, "the rule to stop requiring signatures", func() bool {
		err := never()
		if err != nil && status.Code(err) != codes.PermissionDenied {
			t.Fatalf("signed image, pullPolicy Never, signatures no longer required: %v", err)
		}
		return err == nil
	})
	p.kill()

	// A policy that does not parse stops the plugin at start.
	out, err := exec.Command(bin, "serve", "--endpoint", "unix://"+filepath.Join(e.dir, "other.sock"), "--store-dir", filepath.Join(e.dir, "store2"),
		"--registration", "none", "--metrics-address", "", "--trust-policy", policy+".missing").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--trust-policy") {
		t.Fatalf("serve with a missing policy: %v\n%s", err, out)
	}
}

// waitFor polls cond (bounded: a wait, not a timing assertion).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; !cond(); i++ {
		if i > 600 {
			t.Fatalf("waited 60 s for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
