package registry

import (
	"context"
	"crypto/sha256"
	"os"
	"path/filepath"
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
		if pp != p {
			if left := storeLeftovers(t, pp.store); len(left) > 0 {
				t.Fatalf("wrong password on an empty node left %v in the store", left)
			}
		}
	}

	// A second version sharing 90 % of the files reuses the packs of v1.
	v2 := sourceTree(t, 300, func(i int) bool { return i%10 == 0 })
	ref2 := "oci://" + reg.host + "/team/app:v2"
	_, d2 := reg.push(t, v2, ref2, "--pack-size", "1M", "--base", ref1)

	// The node that has v1 fetches little more than v2's new objects,
	// counted at the registry: ≤ 1.05 × (new objects + image + index).
	reg.reset()
	if _, err := p.publish(t, "v2-on-v1", map[string]string{"image": ref2, "digest": d2}, reg.secrets(reg.pass)); err != nil {
		t.Fatal(err)
	}
	gets, got := reg.blobs()
	a := reg.resolve(t, ref2)
	newBytes := newObjectBytes(t, v1, v2)
	need := newBytes + a.Image.Size + a.Index.Size
	t.Logf("v2 on a node with v1: %d new object bytes + image %d + index %d; the registry served %d blob bytes in %d GETs (%.3f×)",
		newBytes, a.Image.Size, a.Index.Size, got, gets, float64(got)/float64(need))
	if float64(got) > 1.05*float64(need) {
		t.Fatalf("the registry served %d blob bytes for v2, more than 1.05 × %d", got, need)
	}

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

// resolve reads an artifact's layout from the registry.
func (r *distRegistry) resolve(t *testing.T, s string) *oci.Artifact {
	t.Helper()
	ref, err := oci.ParseReference(s)
	if err != nil {
		t.Fatal(err)
	}
	c, err := oci.NewClient(ref, oci.Options{CA: r.caPEM, Username: r.user, Password: r.pass})
	if err != nil {
		t.Fatal(err)
	}
	a, err := c.ResolveArtifact(context.Background(), ref.Tag)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// newObjectBytes is the size of the objects of tree v2 that tree v1 does
// not have: regular files over the inline limit, each content once.
func newObjectBytes(t *testing.T, v1, v2 string) int64 {
	t.Helper()
	contents := func(dir string) map[[32]byte]int64 {
		m := make(map[[32]byte]int64)
		err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
			if err != nil || !fi.Mode().IsRegular() || fi.Size() <= cfs.MaxInlineContent {
				return err
			}
			b, err := os.ReadFile(p)
			m[sha256.Sum256(b)] = fi.Size()
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	old := contents(v1)
	var n int64
	for h, size := range contents(v2) {
		if _, ok := old[h]; !ok {
			n += size
		}
	}
	return n
}
