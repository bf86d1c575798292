package driver

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Paths of the health endpoints on the metrics address; the DaemonSet's
// probes use them.
const (
	// HealthzPath answers 200 while the plugin answers Probe (liveness).
	HealthzPath = "/healthz"
	// ReadyzPath answers 200 once the state is recovered (readiness).
	ReadyzPath = "/readyz"
)

// probeTimeout bounds one liveness check (the livenessprobe sidecar's
// default --probe-timeout is 1s; a node under load deserves more).
const probeTimeout = 3 * time.Second

// WithHealthEndpoint makes /healthz call Probe over the CSI endpoint the
// plugin serves, as the kubelet reaches it, rather than in-process: a gRPC
// server that stopped answering, or a socket file removed from under it,
// then fails the liveness probe.
func WithHealthEndpoint(ep string) Option { return func(d *Driver) { d.healthEndpoint = ep } }

// healthz calls the plugin's Probe. It answers 200 whether or not the
// plugin is ready yet (a recovering plugin is alive; readiness is /readyz)
// and 503 when Probe cannot be called.
func (d *Driver) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), probeTimeout)
	defer cancel()
	ready, err := d.probe(ctx)
	if err != nil {
		http.Error(w, "Probe failed: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	if !ready {
		_, _ = w.Write([]byte("ok (recovering the state; not ready yet)\n"))
		return
	}
	_, _ = w.Write([]byte("ok\n"))
}

// readyz answers 200 once the store is open and the state recovered.
func (d *Driver) readyz(w http.ResponseWriter, _ *http.Request) {
	if !d.ready.Load() {
		http.Error(w, "driver state not recovered yet", http.StatusServiceUnavailable)
		return
	}
	_, _ = w.Write([]byte("ok\n"))
}

// probe calls Probe over the health endpoint, or in-process without one.
func (d *Driver) probe(ctx context.Context) (bool, error) {
	if d.healthEndpoint == "" {
		resp, err := d.Probe(ctx, &csi.ProbeRequest{})
		return resp.GetReady().GetValue(), err
	}
	return ProbeEndpoint(ctx, d.healthEndpoint)
}

// ProbeEndpoint calls the CSI Probe of the plugin at endpoint.
func ProbeEndpoint(ctx context.Context, endpoint string) (ready bool, err error) {
	network, addr, err := ParseEndpoint(endpoint)
	if err != nil {
		return false, err
	}
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, a)
		}))
	if err != nil {
		return false, fmt.Errorf("connecting to %s: %w", endpoint, err)
	}
	defer conn.Close()
	resp, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{}, grpc.WaitForReady(false))
	if err != nil {
		return false, fmt.Errorf("Probe on %s: %w", endpoint, err)
	}
	return resp.GetReady().GetValue(), nil
}
