// Package kind checks the kind configuration of the e2e suite against
// kind's own config types, as `kind create cluster --config` decodes it.
package kind

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"sigs.k8s.io/kind/pkg/apis/config/v1alpha4"
	"sigs.k8s.io/yaml"
)

// decodeStrict decodes like kind: unknown fields are errors.
func decodeStrict(t *testing.T, raw []byte) *v1alpha4.Cluster {
	t.Helper()
	var c v1alpha4.Cluster
	if err := yaml.UnmarshalStrict(raw, &c); err != nil {
		t.Fatalf("kind-config.yaml: %v", err)
	}
	return &c
}

func TestKindConfig(t *testing.T) {
	raw, err := os.ReadFile("kind-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c := decodeStrict(t, raw)
	if c.Kind != "Cluster" || c.APIVersion != "kind.x-k8s.io/v1alpha4" {
		t.Errorf("kind %q apiVersion %q, want Cluster kind.x-k8s.io/v1alpha4", c.Kind, c.APIVersion)
	}
	if c.Name != "csi-composefs-e2e" {
		t.Errorf("cluster name %q, want the one run.sh uses", c.Name)
	}
	if len(c.Nodes) != 1 || c.Nodes[0].Role != v1alpha4.ControlPlaneRole {
		t.Fatalf("nodes %+v, want one control-plane node", c.Nodes)
	}
	var store *v1alpha4.Mount
	for i, m := range c.Nodes[0].ExtraMounts {
		if m.ContainerPath == "/var/lib/csi-composefs" {
			store = &c.Nodes[0].ExtraMounts[i]
		}
	}
	if store == nil {
		t.Fatal("no extraMount at /var/lib/csi-composefs (the chart's store.hostPath)")
	}
	script, err := os.ReadFile("run.sh")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(store.HostPath, "/") || !bytes.Contains(script, []byte(strings.TrimSuffix(store.HostPath, "/store"))) {
		t.Errorf("store hostPath %q is not the folder run.sh mounts the verity ext4 on", store.HostPath)
	}
	if !bytes.Contains(script, []byte("mkfs.ext4 -q -O verity")) {
		t.Error("run.sh does not make the store's file system with -O verity")
	}
}

func TestDecodeStrictRefusesUnknownFields(t *testing.T) {
	bad := []byte("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n- role: control-plane\n  extraMount: []\n")
	var c v1alpha4.Cluster
	if err := yaml.UnmarshalStrict(bad, &c); err == nil {
		t.Fatal("a misspelt field decoded without error: the check would miss typos")
	}
}
