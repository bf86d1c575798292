package driver

import (
	"context"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// TestHealthzCallsProbe: /healthz answers through the CSI socket's Probe:
// 200 while the plugin answers (also while it is still recovering, which
// /readyz reports), 503 once the gRPC server no longer answers.
func TestHealthzCallsProbe(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "csi.sock")
	ep := "unix://" + sock
	st, err := fetch.Open(context.Background(), t.TempDir(), fetch.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	d, err := New(Config{NodeID: "n"}, st, WithHealthEndpoint(ep))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	h := d.HTTPHandler()

	if code, body := get(t, h, HealthzPath); code != http.StatusServiceUnavailable {
		t.Errorf("%s with nothing serving the socket: %d %q, want 503", HealthzPath, code, body)
	}
	l, err := Listen(ep)
	if err != nil {
		t.Fatal(err)
	}
	gs := d.NewGRPCServer()
	go gs.Serve(l)
	defer gs.Stop()

	code, body := get(t, h, HealthzPath)
	if code != http.StatusOK || !strings.Contains(body, "recovering") {
		t.Errorf("%s while recovering: %d %q, want 200 saying it is recovering", HealthzPath, code, body)
	}
	if code, _ := get(t, h, ReadyzPath); code != http.StatusServiceUnavailable {
		t.Errorf("%s while recovering: %d, want 503", ReadyzPath, code)
	}
	if err := d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	if code, body := get(t, h, HealthzPath); code != http.StatusOK || body != "ok\n" {
		t.Errorf("%s: %d %q, want 200 ok", HealthzPath, code, body)
	}
	if code, _ := get(t, h, ReadyzPath); code != http.StatusOK {
		t.Errorf("%s after recovery: %d, want 200", ReadyzPath, code)
	}
	gs.Stop()
	if code, body := get(t, h, HealthzPath); code != http.StatusServiceUnavailable || !strings.Contains(body, "Probe") {
		t.Errorf("%s after the gRPC server stopped: %d %q, want 503 naming Probe", HealthzPath, code, body)
	}
}
