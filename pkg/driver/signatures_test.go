package driver

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/internal/testoci"
	"github.com/csi-composefs/csi-composefs/internal/testsign"
	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
	"github.com/csi-composefs/csi-composefs/pkg/trust"
)

// writePolicy writes a trust policy file and returns its watcher.
func writePolicy(t *testing.T, path, text string) *trust.Watcher {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	w, err := trust.NewWatcher(path)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// lastEvent returns the last event recorded.
func (f *fakeRecorder) last(t *testing.T) recordedEvent {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.events) == 0 {
		t.Fatal("no event")
	}
	return f.events[len(f.events)-1]
}

// HTTP repositories: cosign sign-blob signatures beside the image file,
// checked over the stored image before its objects are fetched.
func TestSignedHTTPImages(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	key, stranger := testsign.NewKey(t), testsign.NewKey(t)
	images := filepath.Join(repo.dir, "images")
	sign := func(name string, k testsign.Key) {
		b, err := os.ReadFile(filepath.Join(images, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(images, name+".sig"), k.SignBlob(t, b), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for i, name := range []string{"signed", "unsigned", "stranger", "truncated", "other-digest", "swapped"} {
		repo.publish(t, name, sampleFiles(100+i))
	}
	sign("signed", key)
	sign("stranger", stranger)
	sign("truncated", key)
	sig, _ := os.ReadFile(filepath.Join(images, "truncated.sig"))
	os.WriteFile(filepath.Join(images, "truncated.sig"), sig[:len(sig)/2], 0o644)
	sig, _ = os.ReadFile(filepath.Join(images, "signed.sig"))
	os.WriteFile(filepath.Join(images, "other-digest.sig"), sig, 0o644)
	sign("swapped", key)
	repo.publish(t, "swapped", sampleFiles(200)) // the image changed after signing

	policy := filepath.Join(t.TempDir(), "policy.yaml")
	w := writePolicy(t, policy, testsign.Policy(repo.srv.URL, true, key))
	rec := &fakeRecorder{}
	e := newTestEnv(t, Config{}, WithTrustPolicy(w), WithEventRecorder(rec))
	node := e.grpcNode(t)
	pod := map[string]string{"csi.storage.k8s.io/pod.name": "web-0", "csi.storage.k8s.io/pod.namespace": "shop"}
	publish := func(name string) (string, error) {
		vc := map[string]string{"repository": repo.srv.URL, "image": name}
		for k, v := range pod {
			vc[k] = v
		}
		target := filepath.Join(t.TempDir(), "vol")
		cleanupMounts(t, target)
		_, err := node.NodePublishVolume(context.Background(), publishReq(name, target, vc))
		return target, err
	}

	target, err := publish("signed")
	if err != nil {
		t.Fatalf("signed image by name: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "etc/version")); err != nil || string(b) != sampleFiles(100)["etc/version"] {
		t.Fatalf("signed image: reading the volume: %q, %v", b, err)
	}
	for _, c := range []struct{ name, want string }{
		{"unsigned", "not signed"},
		{"stranger", "does not verify"},
		{"truncated", "does not verify"},
		{"other-digest", "does not verify"},
		{"swapped", "does not verify"},
	} {
		before := repo.requests("/objects/")
		_, err := publish(c.name)
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want PermissionDenied naming %q", c.name, err, c.want)
			continue
		}
		if n := repo.requests("/objects/") - before; n != 0 {
			t.Errorf("%s: %d object requests for a refused image", c.name, n)
		}
		if ev := rec.last(t); ev.reason != ReasonSignatureRejected || !ev.warning || ev.pod.Name != "web-0" {
			t.Errorf("%s: event %+v, want a %s warning on the pod", c.name, ev, ReasonSignatureRejected)
		}
		t.Logf("%s: %v", c.name, err)
	}

	// The policy changes while the driver runs: signatures no longer
	// required, and a published one by an unknown key still refused.
	if err := os.WriteFile(policy, []byte(testsign.Policy(repo.srv.URL, false, key)), 0o644); err != nil {
		t.Fatal(err)
	}
	if changed, err := w.Reload(); !changed || err != nil {
		t.Fatalf("reload: %v, %v", changed, err)
	}
	if _, err := publish("unsigned"); err != nil {
		t.Errorf("unsigned image, signatures not required: %v", err)
	}
	if _, err := publish("stranger"); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a signature by an unknown key, signatures not required: %v, want PermissionDenied", err)
	}
}

// signerStore moves a tag right after the driver checked its signature.
type signerStore struct {
	*fetch.Store
	after func()
}

func (s *signerStore) ManifestSignatures(ctx context.Context, src fetch.ManifestSigner, name string) (fetch.SignedManifest, error) {
	m, err := s.Store.ManifestSignatures(ctx, src, name)
	if s.after != nil {
		s.after()
	}
	return m, err
}

// Registries: cosign sign --key signatures (the sha256-<hex>.sig tag) and
// sigstore bundle referrers over the manifest digest; a tag is resolved,
// verified and then fetched by that digest.
func TestSignedOCIImages(t *testing.T) {
	needRoot(t)
	reg := testoci.NewRegistry(t, testoci.Options{})
	key, stranger := testsign.NewKey(t), testsign.NewKey(t)
	r := testsign.Repository(t, reg.Host, "team/app")
	repoName := reg.Host + "/team/app"
	push := func(tag string, files map[string]string) (oci.PushResult, string) {
		t.Helper()
		src := t.TempDir()
		writeFiles(t, src, files)
		ref, err := oci.ParseReference("oci://" + repoName + ":" + tag)
		if err != nil {
			t.Fatal(err)
		}
		c, err := oci.NewClient(ref, oci.Options{Insecure: []string{reg.Host}})
		if err != nil {
			t.Fatal(err)
		}
		in, err := oci.InputFromDir(context.Background(), src, cfs.DirOptions{}, cfs.DefaultWriteOptions())
		if err != nil {
			t.Fatal(err)
		}
		res, err := oci.Push(context.Background(), c, in, oci.PushOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return res, testsign.Manifest(t, r, tag).Digest.String()
	}
	files := func(s string) map[string]string {
		return map[string]string{"etc/version": s + "\n", "lib/big": strings.Repeat(s, 4096)}
	}
	res1, m1 := push("v1", files("one"))
	key.Sign(t, r, repoName, m1)
	push("unsigned", files("unsigned"))
	res3, m3 := push("bundled", files("bundled"))
	testsign.AttachBundle(t, r, testsign.Manifest(t, r, "bundled"), key.ManifestBundle(t, repoName, m3))
	_, m4 := push("stranger", files("stranger"))
	stranger.Sign(t, r, repoName, m4)
	testsign.AttachBundle(t, r, testsign.Manifest(t, r, "stranger"), stranger.ManifestBundle(t, repoName, m4))
	_, m5 := push("other-digest", files("other"))
	testsign.CosignSign(t, r, m5, testsign.SimpleSigning{ // a signature of v1 under v5's tag
		Payload: testsign.SimpleSigningPayload(t, repoName, m1), Signature: signatureOf(t, key, testsign.SimpleSigningPayload(t, repoName, m1))})

	policy := filepath.Join(t.TempDir(), "policy.yaml")
	w := writePolicy(t, policy, testsign.Policy("oci://"+reg.Host+"/team", true, key))
	rec := &fakeRecorder{}
	ctx := klog.NewContext(context.Background(), klog.Background())
	storeDir := t.TempDir()
	st, err := fetch.Open(ctx, storeDir, fetch.Options{Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { st.Close() }()
	ss := &signerStore{Store: st}
	d, err := New(Config{NodeID: "n", Registries: RegistryConfig{Insecure: []string{reg.Host}}}, ss, WithTrustPolicy(w), WithEventRecorder(rec))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { d.Close() }()
	if err := d.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	node := serveGRPC(t, d)
	publish := func(tag, pull string, extra ...string) (string, error) {
		vc := map[string]string{"image": "oci://" + repoName + ":" + tag, "csi.storage.k8s.io/pod.name": "web-0", "csi.storage.k8s.io/pod.namespace": "shop"}
		if pull != "" {
			vc["pullPolicy"] = pull
		}
		for i := 0; i+1 < len(extra); i += 2 {
			vc[extra[i]] = extra[i+1]
		}
		target := filepath.Join(t.TempDir(), "vol")
		cleanupMounts(t, target)
		_, err := node.NodePublishVolume(context.Background(), publishReq(tag, target, vc))
		return target, err
	}
	readVersion := func(target string) string {
		b, _ := os.ReadFile(filepath.Join(target, "etc/version"))
		return string(b)
	}

	for _, tag := range []string{"v1", "bundled"} {
		target, err := publish(tag, "")
		if err != nil {
			t.Fatalf("%s, signed, by tag: %v", tag, err)
		}
		if got, want := readVersion(target), files(map[string]string{"v1": "one", "bundled": "bundled"}[tag])["etc/version"]; got != want {
			t.Fatalf("%s: the volume reads %q, want %q", tag, got, want)
		}
	}
	// Verified before: the same tag again, or its digest, asks the
	// registry nothing.
	reg.Reset()
	if _, err := publish("v1", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := publish("v1", "", "digest", res1.Digest.String()); err != nil {
		t.Fatal(err)
	}
	if n := reg.Counts().Requests; n != 0 {
		t.Errorf("an image verified before: %d registry requests", n)
	}
	for _, c := range []struct{ tag, want string }{
		{"unsigned", "not signed"},
		{"stranger", "does not accept"}, // the bundle's key hint names another key
		{"other-digest", "signs manifest " + m1[:40]},
	} {
		_, err := publish(c.tag, "")
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want PermissionDenied naming %q", c.tag, err, c.want)
			continue
		}
		if ev := rec.last(t); ev.reason != ReasonSignatureRejected {
			t.Errorf("%s: event %+v, want %s", c.tag, ev, ReasonSignatureRejected)
		}
		t.Logf("%s: %v", c.tag, err)
	}

	// The tag moves to unsigned content between the check and the fetch:
	// what was verified is what gets mounted.
	ss.after = func() {
		ss.after = nil
		push("v1", files("moved"))
	}
	target, err := publish("v1", "Always")
	if err != nil {
		t.Fatalf("v1 moved after verification: %v", err)
	}
	if got := readVersion(target); got != "one\n" {
		t.Fatalf("v1 moved after verification: the volume reads %q, the signed content says \"one\"", got)
	}
	// Asked again, the tag names the unsigned manifest: refused.
	if _, err := publish("v1", "Always"); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("v1 moved to an unsigned manifest: %v, want PermissionDenied", err)
	}

	// A restart (a new driver on the same store): the manifest signatures
	// kept for v1 (cosign's tag) and bundled (a bundle referrer) verify
	// again offline for pullPolicy Never, under the policy of the new
	// process.
	restart := func(policyText string) {
		t.Helper()
		d.Close()
		st.Close()
		if st, err = fetch.Open(ctx, storeDir, fetch.Options{Retries: -1}); err != nil {
			t.Fatal(err)
		}
		w := writePolicy(t, filepath.Join(t.TempDir(), "policy.yaml"), policyText)
		if d, err = New(Config{NodeID: "n", Registries: RegistryConfig{Insecure: []string{reg.Host}}}, st, WithTrustPolicy(w), WithEventRecorder(rec)); err != nil {
			t.Fatal(err)
		}
		if err := d.Recover(ctx); err != nil {
			t.Fatal(err)
		}
		node = serveGRPC(t, d)
	}
	restart(testsign.Policy("oci://"+reg.Host+"/team", true, key))
	reg.Reset()
	for tag, dg := range map[string]cfs.Digest{"v1": res1.Digest, "bundled": res3.Digest} {
		if _, err := publish(tag, "Never", "digest", dg.String()); err != nil {
			t.Errorf("%s, pullPolicy Never, after a restart: %v", tag, err)
		}
	}
	if n := reg.Counts().Requests; n != 0 {
		t.Errorf("pullPolicy Never: %d registry requests", n)
	}
	// IfNotPresent asks the registry again (the manifest-to-image link is
	// only the store's word): the tag bundled still names the signed image.
	if _, err := publish("bundled", "", "digest", res3.Digest.String()); err != nil {
		t.Errorf("bundled by digest after a restart: %v", err)
	}
	if n := reg.Counts().Requests; n == 0 {
		t.Error("IfNotPresent after a restart: the registry was not asked")
	}
	// Someone who can write the store plants v1's genuine kept signature
	// (and manifest) as the only one of another stored image: for an
	// artifact the signed manifest must name the image, so it is refused.
	kept1, err := st.KeptSignatures(ctx, res1.Digest)
	if err != nil || len(kept1) == 0 || len(kept1[0].ManifestBytes) == 0 {
		t.Fatalf("v1's kept signatures: %+v, %v; want one with the manifest kept", kept1, err)
	}
	kept3, err := st.KeptSignatures(ctx, res3.Digest)
	if err != nil || len(kept3) == 0 {
		t.Fatalf("bundled's kept signatures: %+v, %v", kept3, err)
	}
	plant := func(ks fetch.KeptSignature) {
		t.Helper()
		b, err := json.Marshal(map[string]any{"version": 1, "signatures": []fetch.KeptSignature{ks}})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(storeDir, "signatures", res3.Digest.String()+".json"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name string
		ks   func(fetch.KeptSignature) fetch.KeptSignature
		want string
	}{
		{"v1's signature and manifest", func(k fetch.KeptSignature) fetch.KeptSignature { return k }, "names image " + res1.Digest.String()},
		{"v1's signature without its manifest", func(k fetch.KeptSignature) fetch.KeptSignature { k.ManifestBytes = nil; return k }, "no copy of the manifest"},
		{"v1's signature with bundled's manifest", func(k fetch.KeptSignature) fetch.KeptSignature {
			k.ManifestBytes = kept3[len(kept3)-1].ManifestBytes
			return k
		}, "not the signed " + m1},
	} {
		plant(c.ks(kept1[len(kept1)-1]))
		restart(testsign.Policy("oci://"+reg.Host+"/team", true, key))
		_, err := publish("bundled", "Never", "digest", res3.Digest.String())
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s planted as bundled's, pullPolicy Never: %v, want PermissionDenied naming %q", c.name, err, c.want)
		}
	}
	plant(kept3[len(kept3)-1]) // its own again
	restart(testsign.Policy("oci://"+reg.Host+"/team", true, key))
	if _, err := publish("bundled", "Never", "digest", res3.Digest.String()); err != nil {
		t.Errorf("bundled's own kept signature restored, pullPolicy Never: %v", err)
	}

	// The key leaves the policy: its kept signatures no longer count.
	restart(testsign.Policy("oci://"+reg.Host+"/team", true, stranger))
	for tag, dg := range map[string]cfs.Digest{"v1": res1.Digest, "bundled": res3.Digest} {
		if _, err := publish(tag, "Never", "digest", dg.String()); status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s, pullPolicy Never, its key removed from the policy: %v, want PermissionDenied", tag, err)
		}
	}
}

// signatureOf is the base64 signature the key makes over b.
func signatureOf(t *testing.T, k testsign.Key, b []byte) string {
	return strings.TrimSpace(string(k.SignBlob(t, b)))
}

// TestKeptSignaturesAfterRestart (HTTP repositories): the signature an
// IfNotPresent publish verified is kept in the store; after a restart it is
// verified again offline (pullPolicy Never, and IfNotPresent without asking
// the repository). A kept file changed by someone who can write the store
// is not a verdict: another signature in its place does not verify over
// the image (PermissionDenied), a damaged file is no signature
// (FailedPrecondition), and the next IfNotPresent publish keeps a good one.
func TestKeptSignaturesAfterRestart(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	key := testsign.NewKey(t)
	images := filepath.Join(repo.dir, "images")
	dg := repo.publish(t, "signed", sampleFiles(300))
	other := repo.publish(t, "other", sampleFiles(301))
	sigOf := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(images, name))
		if err != nil {
			t.Fatal(err)
		}
		return key.SignBlob(t, b)
	}
	if err := os.WriteFile(filepath.Join(images, "signed.sig"), sigOf("signed"), 0o644); err != nil {
		t.Fatal(err)
	}
	otherSig := sigOf("other")
	policyText := testsign.Policy(repo.srv.URL, true, key)
	e := newTestEnv(t, Config{}, WithTrustPolicy(writePolicy(t, filepath.Join(t.TempDir(), "policy.yaml"), policyText)))
	restart := func() {
		t.Helper()
		e.close()
		e.open(Config{}, WithTrustPolicy(writePolicy(t, filepath.Join(t.TempDir(), "policy.yaml"), policyText)))
	}
	n := 0
	publish := func(pull string) error {
		n++
		target := filepath.Join(t.TempDir(), "vol")
		cleanupMounts(t, target)
		vc := map[string]string{"repository": repo.srv.URL, "image": "signed", "digest": dg.String(), "pullPolicy": pull}
		_, err := e.d.NodePublishVolume(context.Background(), publishReq(fmt.Sprint("v", n), target, vc))
		return err
	}
	if err := publish("IfNotPresent"); err != nil {
		t.Fatal(err)
	}
	kept := filepath.Join(e.root, "signatures", dg.String()+".json")
	good, err := os.ReadFile(kept)
	if err != nil {
		t.Fatalf("the verified signature is not kept: %v", err)
	}

	restart()
	before := repo.requests("/images/")
	if err := publish("Never"); err != nil {
		t.Fatalf("pullPolicy Never after a restart: %v", err)
	}
	restart()
	if err := publish("IfNotPresent"); err != nil {
		t.Fatalf("IfNotPresent after a restart: %v", err)
	}
	if n := repo.requests("/images/") - before; n != 0 {
		t.Errorf("after a restart: %d requests for images or signatures, want none (the kept signature verifies)", n)
	}

	// Someone who can write the store puts a genuine signature of another
	// image in its place.
	var kf struct {
		Version    int                   `json:"version"`
		Signatures []fetch.KeptSignature `json:"signatures"`
	}
	if err := json.Unmarshal(good, &kf); err != nil || len(kf.Signatures) != 1 {
		t.Fatalf("kept file %s: %v", good, err)
	}
	kf.Signatures[0].Blob = otherSig
	forged, _ := json.Marshal(kf)
	for _, c := range []struct {
		name string
		data []byte
		want codes.Code
	}{
		{"a signature of image " + other.String()[:12], forged, codes.PermissionDenied},
		{"a damaged file", []byte("{"), codes.FailedPrecondition},
	} {
		if err := os.WriteFile(kept, c.data, 0o644); err != nil {
			t.Fatal(err)
		}
		restart()
		if err := publish("Never"); status.Code(err) != c.want {
			t.Errorf("kept file replaced by %s: %v, want %s", c.name, err, c.want)
		}
	}
	// IfNotPresent verifies from the repository again and keeps it.
	if err := publish("IfNotPresent"); err != nil {
		t.Fatal(err)
	}
	restart()
	if err := publish("Never"); err != nil {
		t.Fatalf("pullPolicy Never after the signature was kept again: %v", err)
	}
}
