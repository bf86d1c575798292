package suite

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-composefs/csi-composefs/test/e2e/cluster/internal/helmops"
)

func (e *env) helmRelease() helmops.Release {
	kc := os.Getenv("KUBECONFIG")
	if kc == "" {
		kc = filepath.Join(getenv("E2E_WORK", "/var/tmp/csi-composefs-e2e"), "pki", "admin.kubeconfig")
	}
	return helmops.Release{Kubeconfig: kc, Namespace: e.namespace, Name: e.release}
}

// helmUpgrade upgrades the driver's release with its values and sets over
// them, and waits for the DaemonSet to roll out.
func (e *env) helmUpgrade(t *testing.T, sets ...string) {
	t.Helper()
	vals := map[string]any{}
	if err := helmops.ParseSet(vals, sets...); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	ds, err := e.daemonSet(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.helmRelease().Upgrade(ctx, e.chart, vals); err != nil {
		t.Fatal(err)
	}
	if err := e.waitDaemonSetReady(ctx, ds.Generation); err != nil {
		t.Fatal(err)
	}
}
