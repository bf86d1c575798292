package driver

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	body, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, string(body)
}

func TestHealthAndReadiness(t *testing.T) {
	st, err := fetch.Open(context.Background(), t.TempDir(), fetch.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	d, err := New(Config{NodeID: "n"}, st)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	h := d.HTTPHandler()
	if code, _ := get(t, h, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d", code)
	}
	if code, _ := get(t, h, "/readyz"); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz before recovery: %d, want 503", code)
	}
	if p, _ := d.Probe(context.Background(), nil); p.GetReady().GetValue() {
		t.Error("Probe ready before recovery")
	}
	if err := d.Recover(klog.NewContext(context.Background(), klog.Background())); err != nil {
		t.Fatal(err)
	}
	if code, _ := get(t, h, "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz after recovery: %d", code)
	}
	if p, _ := d.Probe(context.Background(), nil); !p.GetReady().GetValue() {
		t.Error("Probe not ready after recovery")
	}
}

func TestMetricsAfterPublish(t *testing.T) {
	needRoot(t)
	e, repo, target, _ := publishSample(t, 6)
	_, _ = e.d.NodePublishVolume(context.Background(), publishReq("v", target, map[string]string{"repository": repo.srv.URL, "imgae": "x"}))
	_, body := get(t, e.d.HTTPHandler(), "/metrics")
	for _, want := range []string{
		`csi_composefs_publish_duration_seconds_count{result="OK"} 1`,
		`csi_composefs_publish_duration_seconds_count{result="InvalidArgument"} 1`,
		`csi_composefs_volumes_published 1`,
		`csi_composefs_fetched_total{kind="image"} 1`,
		`csi_composefs_fetches_total{result="OK"} 1`,
		`csi_composefs_store_bytes{part="objects"}`,
		`csi_composefs_store_bytes{part="signatures"}`,
		`csi_composefs_dedup_saved_bytes_total`,
		`csi_composefs_proofs_total{result="failed"} 0`,
		`csi_composefs_volumes_published_by_verity{verity="userspace"} 1`,
		`csi_composefs_volumes_published_by_verity{verity="require"} 0`,
		`csi_composefs_volumes_published_by_verity{verity="off"} 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	storeVerity := "csi_composefs_store_fsverity 0"
	if e.store.VerityEnabled() {
		storeVerity = "csi_composefs_store_fsverity 1"
	}
	if !strings.Contains(body, storeVerity) {
		t.Errorf("/metrics lacks %q", storeVerity)
	}
	if c := e.volumeCondition(t, target); c.GetAbnormal() || !strings.Contains(c.GetMessage(), "verity: userspace") {
		t.Errorf("volume condition %+v does not say verity: userspace", c)
	}
	if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
}

// TestMinVerityRequireRefusesToServe: a node whose floor is require but
// whose store cannot have fs-verity would refuse every volume; it refuses
// to start instead, naming the flag and the store. (Where the store has
// fs-verity the VM test in test/e2e/vm starts one and serves require.)
func TestMinVerityRequireRefusesToServe(t *testing.T) {
	root := t.TempDir()
	st, err := fetch.Open(context.Background(), root, fetch.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if st.VerityEnabled() {
		t.Skip("the test directory's filesystem has fs-verity here")
	}
	d, err := New(Config{NodeID: "n", MinVerity: cfs.VerityRequire}, st)
	if err == nil {
		d.Close()
		t.Fatal("a driver with --min-verity=require started over a store without fs-verity")
	}
	if !strings.Contains(err.Error(), "--min-verity=require") || !strings.Contains(err.Error(), root) {
		t.Errorf("error %q names neither the flag nor the store", err)
	}
	d, err = New(Config{NodeID: "n", MinVerity: cfs.VerityUserspace}, st)
	if err != nil {
		t.Fatalf("--min-verity=userspace: %v", err)
	}
	d.Close()
}
