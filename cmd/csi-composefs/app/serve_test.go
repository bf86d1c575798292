package app

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"
)

// parse runs the serve command on args and returns the configuration it
// would serve with.
func parse(t *testing.T, args ...string) (ServeConfig, error) {
	t.Helper()
	var got ServeConfig
	cmd := NewServeCommand(Command{Version: "test", Run: func(_ context.Context, c ServeConfig) error {
		got = c
		return nil
	}})
	cmd.SetArgs(args)
	cmd.SetOut(io.Discard)
	cmd.SetErr(io.Discard)
	err := cmd.ExecuteContext(context.Background())
	return got, err
}

func TestServeRegistrationFlags(t *testing.T) {
	c, err := parse(t)
	if err != nil {
		t.Fatal(err)
	}
	r := c.Registration
	if !r.Enabled || r.Socket != "/var/lib/kubelet/plugins_registry/composefs.csi.dev-reg.sock" ||
		r.Endpoint != "/var/lib/kubelet/plugins/composefs.csi.dev/csi.sock" {
		t.Errorf("defaults: %+v", r)
	}

	c, err = parse(t, "--kubelet-root=/k", "--driver-name=x.example.com", "--endpoint=unix:///csi/csi.sock")
	if err != nil {
		t.Fatal(err)
	}
	if r := c.Registration; r.Socket != "/k/plugins_registry/x.example.com-reg.sock" || r.Endpoint != "/k/plugins/x.example.com/csi.sock" {
		t.Errorf("kubelet root /k: %+v", r)
	}
	c, err = parse(t, "--kubelet-registration-path=/host/csi.sock")
	if err != nil || c.Registration.Endpoint != "/host/csi.sock" {
		t.Errorf("--kubelet-registration-path: %+v, %v", c.Registration, err)
	}
	c, err = parse(t, "--trust-shared-content")
	if err != nil || !c.Driver.TrustSharedContent {
		t.Errorf("--trust-shared-content: %+v, %v", c.Driver, err)
	}
	if c, _ := parse(t); c.Driver.TrustSharedContent {
		t.Error("shared content trusted by default")
	}
	c, err = parse(t, "--max-downloads=32")
	if err != nil || c.Store.MaxConcurrentDownloads != 32 {
		t.Errorf("--max-downloads=32: %+v, %v", c.Store, err)
	}
	if c, _ := parse(t); c.Store.MaxConcurrentDownloads != 256 {
		t.Errorf("--max-downloads default: %d, want 256", c.Store.MaxConcurrentDownloads)
	}
	c, err = parse(t, "--allow-noncanonical-images")
	if err != nil || !c.Store.AllowNonCanonicalImages {
		t.Errorf("--allow-noncanonical-images: %+v, %v", c.Store, err)
	}
	if c, _ := parse(t); c.Store.AllowNonCanonicalImages {
		t.Error("non-canonical images allowed by default")
	}
	c, err = parse(t, "--registration=none")
	if err != nil || c.Registration.Enabled {
		t.Errorf("--registration=none: %+v, %v", c.Registration, err)
	}

	for _, c := range []struct {
		args []string
		want string // the error names this
	}{
		{[]string{"--registration=sidecar"}, "--registration"},
		{[]string{"--kubelet-root=relative"}, "--kubelet-root"},
		{[]string{"--kubelet-registration-path=csi.sock"}, "--kubelet-registration-path"},
		{[]string{"--registration=none", "--kubelet-registration-path=/x/csi.sock"}, "--kubelet-registration-path"},
		{[]string{"--endpoint=tcp://127.0.0.1:1"}, "unix --endpoint"}, // the kubelet dials a socket path
		{[]string{"--driver-name=a/b"}, "--driver-name"},
		{[]string{"--driver-name="}, "--driver-name"},
		{[]string{"--min-verity=maybe"}, "--min-verity"},
		{[]string{"--store-max-size=lots"}, "--store-max-size"},
		{[]string{"--fetch-concurrency=0"}, "--fetch-concurrency"},
		{[]string{"--max-downloads=0"}, "--max-downloads"},
		{[]string{"--gc-grace=-1s"}, "--gc-grace"},
		{[]string{"--download-budget=lots"}, "--download-budget"},
		{[]string{"--allowed-sources=not a url"}, "--allowed-sources"},
		{[]string{"extra-arg"}, "argument"},
	} {
		if _, err := parse(t, c.args...); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want an error naming %s", c.args, err, c.want)
		}
	}
}

func TestServeKlogFlags(t *testing.T) {
	for _, v := range []string{"-v=4", "--v=4", "-v4"} {
		if _, err := parse(t, v); err != nil {
			t.Errorf("%s: %v", v, err)
		}
	}
}

func TestServeTrustFlags(t *testing.T) {
	c, err := parse(t)
	if err != nil || c.Trust.PolicyFile != "" || c.Trust.Poll <= 0 {
		t.Errorf("defaults: %+v, %v", c.Trust, err)
	}
	c, err = parse(t, "--trust-policy=/etc/csi-composefs/trust/policy.yaml", "--trust-policy-poll=3s")
	if err != nil || c.Trust.PolicyFile != "/etc/csi-composefs/trust/policy.yaml" || c.Trust.Poll != 3*time.Second {
		t.Errorf("--trust-policy: %+v, %v", c.Trust, err)
	}
	if _, err := parse(t, "--trust-policy-poll=0s"); err == nil || !strings.Contains(err.Error(), "--trust-policy-poll") {
		t.Errorf("--trust-policy-poll=0s: %v", err)
	}
}
