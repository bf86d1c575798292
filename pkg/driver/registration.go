package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// SupportedCSIVersions are the CSI versions the plugin reports to the
// kubelet's plugin watcher. The kubelet takes the highest 1.x of them (it
// refuses a list without one); 1.0.0 is what node-driver-registrar reports.
var SupportedCSIVersions = []string{"1.0.0"}

// driverNameRE is the syntax the CSI spec gives plugin names (the CSIDriver
// object's name): at most 63 characters, alphanumerics with dashes, dots
// and underscores inside. The name is also part of socket paths.
var driverNameRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$`)

// CheckDriverName validates a CSI plugin name.
func CheckDriverName(name string) error {
	if !driverNameRE.MatchString(name) {
		return fmt.Errorf("%q is not a CSI plugin name (at most 63 characters: letters, digits, '-', '.', '_', beginning and ending with a letter or digit)", name)
	}
	return nil
}

// RegistrationConfig says whether and how the plugin registers itself with
// the kubelet (the job node-driver-registrar does as a sidecar).
type RegistrationConfig struct {
	// Enabled serves the registration API on Socket.
	Enabled bool
	// Socket is the registration socket the kubelet's plugin watcher finds:
	// KUBELET-ROOT/plugins_registry/DRIVER-reg.sock.
	Socket string
	// Endpoint is the CSI socket's path as the kubelet sees it on the
	// host (the plugin's own view may differ inside a container).
	Endpoint string
	// RetryMin and RetryMax bound the wait before the socket is made anew
	// after the kubelet reports a failed registration; 0 means 1s and 2m.
	RetryMin, RetryMax time.Duration
}

// Registrar serves the kubelet plugin-registration API
// (pluginregistration.v1): the kubelet's plugin watcher finds the socket,
// calls GetInfo, validates the versions, calls NodeGetInfo on the CSI
// endpoint and reports the outcome with NotifyRegistrationStatus. A failed
// registration is logged as an error, and the socket is made anew after a
// backoff so that the watcher sees a new socket and tries again.
type Registrar struct {
	registerapi.UnimplementedRegistrationServer

	name string
	cfg  RegistrationConfig

	registered atomic.Bool
	failed     chan string // registration errors the kubelet reported
}

// NewRegistrar returns the registration server of driver name.
func NewRegistrar(name string, cfg RegistrationConfig) (*Registrar, error) {
	if err := CheckDriverName(name); err != nil {
		return nil, err
	}
	if !filepath.IsAbs(cfg.Socket) {
		return nil, fmt.Errorf("registration socket %q: want an absolute path", cfg.Socket)
	}
	if !filepath.IsAbs(cfg.Endpoint) {
		return nil, fmt.Errorf("registration endpoint %q: want the CSI socket's absolute path on the host", cfg.Endpoint)
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = time.Second
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = 2 * time.Minute
	}
	return &Registrar{name: name, cfg: cfg, failed: make(chan string, 1)}, nil
}

// Registered reports whether the kubelet confirmed the last registration.
func (r *Registrar) Registered() bool { return r.registered.Load() }

// GetInfo tells the kubelet what plugin this is and where its CSI socket is.
func (r *Registrar) GetInfo(ctx context.Context, _ *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	klog.FromContext(ctx).V(2).Info("Kubelet asked for the plugin's registration info", "endpoint", r.cfg.Endpoint)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.cfg.Endpoint,
		SupportedVersions: append([]string(nil), SupportedCSIVersions...),
	}, nil
}

// NotifyRegistrationStatus receives the kubelet's verdict.
func (r *Registrar) NotifyRegistrationStatus(ctx context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	log := klog.FromContext(ctx)
	if st.GetPluginRegistered() {
		r.registered.Store(true)
		log.Info("Registered with the kubelet", "driver", r.name, "endpoint", r.cfg.Endpoint)
		return &registerapi.RegistrationStatusResponse{}, nil
	}
	r.registered.Store(false)
	log.Error(errors.New(st.GetError()), "The kubelet refused the plugin's registration; the registration socket will be made anew",
		"driver", r.name, "endpoint", r.cfg.Endpoint, "socket", r.cfg.Socket)
	select {
	case r.failed <- st.GetError():
	default: // a retry is already due
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// Run serves the registration socket until ctx ends, then removes it (the
// kubelet then unregisters the plugin until a new one registers). It
// returns an error only when the socket cannot be made the first time.
func (r *Registrar) Run(ctx context.Context) error {
	log := klog.FromContext(ctx).WithValues("socket", r.cfg.Socket)
	ctx = klog.NewContext(ctx, log)
	wait := r.cfg.RetryMin
	for first := true; ; first = false {
		srv, served, err := r.serve(ctx)
		if err != nil {
			if first {
				return fmt.Errorf("registration socket: %w", err)
			}
			log.Error(err, "Making the registration socket anew failed; trying again", "in", wait)
		} else {
			log.V(2).Info("Serving the kubelet plugin-registration API", "endpoint", r.cfg.Endpoint)
			select {
			case <-ctx.Done():
				stopGRPC(srv, 5*time.Second)
				return nil
			case err := <-served:
				log.Error(err, "Registration server stopped; making the socket anew", "in", wait)
			case <-r.failed:
				log.Info("Making the registration socket anew so that the kubelet tries again", "in", wait)
			}
			stopGRPC(srv, 5*time.Second)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		wait = min(2*wait, r.cfg.RetryMax)
	}
}

// serve makes the socket and serves it in the background.
func (r *Registrar) serve(ctx context.Context) (*grpc.Server, <-chan error, error) {
	l, err := ListenUnix(r.cfg.Socket)
	if err != nil {
		return nil, nil, err
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(func(c context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		return h(klog.NewContext(c, klog.FromContext(ctx)), req)
	}))
	registerapi.RegisterRegistrationServer(srv, r)
	served := make(chan error, 1)
	go func() {
		err := srv.Serve(l)
		if err == nil || errors.Is(err, grpc.ErrServerStopped) || errors.Is(err, net.ErrClosed) {
			err = errors.New("stopped")
		}
		served <- err
	}()
	return srv, served, nil
}

// stopGRPC stops s gracefully (a reply being sent goes out), or at once
// after timeout. Stopping closes the listener, which removes its socket.
func stopGRPC(s *grpc.Server, timeout time.Duration) {
	done := make(chan struct{})
	go func() { s.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
		s.Stop()
	}
}
