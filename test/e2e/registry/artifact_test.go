package registry

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
)

// push pushes dir with the CLI (basic auth, the registry's CA) and returns
// the manifest digest and the composefs digest it prints.
func (r *distRegistry) push(t *testing.T, dir, ref string, extra ...string) (manifest, image string) {
	t.Helper()
	args := append([]string{"image", "push", "--ca-file", r.caFile, "--username", r.user, "--password-file", r.passwd}, extra...)
	out, err := cli(t, nil, append(args, dir, ref)...)
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(out)
	if len(f) != 2 || !strings.HasPrefix(f[0], "sha256:") || len(f[1]) != 64 {
		t.Fatalf("image push printed %q, want the manifest digest and the composefs digest", out)
	}
	return f[0], f[1]
}

// TestArtifactThroughDistribution pushes a tree with the CLI to
// distribution (TLS, htpasswd), publishes it through the plugin with the
// usual pull secret (.dockerconfigjson and ca.crt) and compares every
// file; wrong credentials are a final PermissionDenied after a handful of
// requests. Then a second version sharing 90 % of the files is pushed
// (reusing the first's packs), the first version's manifest deleted and
// distribution's garbage collector run with --delete-untagged: a plugin
// with an empty store publishes the second version whole, and the first
// is gone.
func TestArtifactThroughDistribution(t *testing.T) {
	needBinary(t)
	reg := newDistRegistry(t)
	v1 := sourceTree(t, 300, nil)
	ref1 := "oci://" + reg.host + "/team/app:v1"
	m1, d1 := reg.push(t, v1, ref1, "--pack-size", "1M")

	p := startPlugin(t)
	vc1 := map[string]string{"image": ref1, "digest": d1}
	target, err := p.publish(t, "v1", vc1, reg.secrets(reg.pass))
	if err != nil {
		t.Fatal(err)
	}
	n := sameTree(t, target, v1)
	t.Logf("v1 (%s): %d entries match the source", m1, n)

	// Wrong credentials: final, and no retry storm, with the content on
	// the node and without it.
	for _, pp := range []*plugin{p, startPlugin(t)} {
		reg.reset()
		_, err := pp.publish(t, "wrong", vc1, reg.secrets("wrong password"))
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("wrong password: %v, want PermissionDenied", err)
		}
		if reqs, denied := reg.counts(); reqs > 6 || denied > 3 {
			t.Fatalf("wrong password: %d requests (%d denied) for a refusal", reqs, denied)
		}
	}

	// A second version sharing 90 % of the files reuses the packs of v1.
	v2 := sourceTree(t, 300, func(i int) bool { return i%10 == 0 })
	ref2 := "oci://" + reg.host + "/team/app:v2"
	_, d2 := reg.push(t, v2, ref2, "--pack-size", "1M", "--base", ref1)
	reg.deleteManifest(t, "team/app", m1)
	removed := reg.gc(t)
	if removed == 0 {
		t.Fatalf("the garbage collector removed nothing after v1's manifest was deleted")
	}
	t.Logf("garbage collection removed %d blobs", removed)

	// Nothing v2 needs was collected: a node with an empty store gets it
	// whole (the CLI's pull, and the plugin), and v1 is gone.
	store := t.TempDir()
	out, err := cli(t, []string{"DOCKER_CONFIG=" + reg.authDir}, "pull", "--ca-file", reg.caFile, "--store-dir", store, "--progress", "plain", ref2)
	if err != nil || strings.TrimSpace(out) != d2 {
		t.Fatalf("pull after GC: %q, %v; want %s", out, err, d2)
	}
	fresh := startPlugin(t)
	target2, err := fresh.publish(t, "v2", map[string]string{"image": ref2, "digest": d2}, reg.secrets(reg.pass))
	if err != nil {
		t.Fatalf("publishing v2 after GC: %v", err)
	}
	sameTree(t, target2, v2)
	if _, err := fresh.publish(t, "v1", vc1, reg.secrets(reg.pass)); status.Code(err) != codes.NotFound {
		t.Fatalf("v1 after its manifest was deleted and GC: %v, want NotFound", err)
	}
}

// TestShardedArtifactThroughDistribution pushes an artifact of more than
// 100 layers (an image index of shard manifests), runs the garbage
// collector with --delete-untagged (the shards are untagged manifests
// only the index names) and publishes it whole on an empty node.
func TestShardedArtifactThroughDistribution(t *testing.T) {
	needBinary(t)
	reg := newDistRegistry(t)
	src := sourceTree(t, 130, nil)
	ref, err := oci.ParseReference("oci://" + reg.host + "/team/sharded:v1")
	if err != nil {
		t.Fatal(err)
	}
	c, err := oci.NewClient(ref, oci.Options{CA: reg.caPEM, Username: reg.user, Password: reg.pass})
	if err != nil {
		t.Fatal(err)
	}
	in, err := oci.InputFromDir(context.Background(), src, cfs.DirOptions{}, cfs.WriteOptions{MinVersion: 1, MaxVersion: 1})
	if err != nil {
		t.Fatal(err)
	}
	// One object per pack: more than MaxManifestLayers layers.
	res, err := oci.Push(context.Background(), c, in, oci.PushOptions{PackSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	if res.Packs+2 <= oci.MaxManifestLayers || res.Manifest.MediaType != "application/vnd.oci.image.index.v1+json" {
		t.Fatalf("%d packs pushed as %s, want an image index past %d layers", res.Packs, res.Manifest.MediaType, oci.MaxManifestLayers)
	}
	a, err := c.ResolveArtifact(context.Background(), "v1")
	if err != nil || len(a.Packs) != res.Packs {
		t.Fatalf("resolving the sharded artifact: %v (%d packs of %d)", err, len(a.Packs), res.Packs)
	}
	if removed := reg.gc(t); removed != 0 {
		t.Fatalf("the garbage collector removed %d blobs of a tagged artifact", removed)
	}
	p := startPlugin(t)
	target, err := p.publish(t, "sharded", map[string]string{"image": ref.String(), "digest": res.Digest.String()}, reg.secrets(reg.pass))
	if err != nil {
		t.Fatal(err)
	}
	n := sameTree(t, target, src)
	t.Logf("%d packs in an index of shards; %d entries match after GC", res.Packs, n)
}
