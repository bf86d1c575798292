package driver

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"k8s.io/klog/v2"

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
		`csi_composefs_dedup_saved_bytes_total`,
		`csi_composefs_proofs_total{result="failed"} 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
}
