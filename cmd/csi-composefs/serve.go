package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/cmd/csi-composefs/app"
	"github.com/csi-composefs/csi-composefs/pkg/driver"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/trust"
)

// newServeCmd is the node plugin; its flags live in package app so that
// the deployment tests parse the DaemonSet's arguments with them.
func newServeCmd() *cobra.Command {
	return app.NewServeCommand(app.Command{Version: version, UsageErrorf: usageErrorf, Run: serve})
}

func serve(ctx context.Context, c app.ServeConfig) error {
	log := klog.Background()
	ctx = klog.NewContext(ctx, log)
	log.Info("Starting csi-composefs", "version", version, "driver", c.Driver.DriverName, "endpoint", c.Endpoint, "store", c.StoreDir)
	if c.Driver.TrustSharedContent {
		log.Info("WARNING: --trust-shared-content: content on this node serves every volume that names it; sources are not asked to show that they hold it")
	}
	if c.Store.AllowNonCanonicalImages {
		log.Info("WARNING: --allow-noncanonical-images: images from any writer reach the kernel's EROFS parser (crafted images too)")
	}
	if len(c.Driver.AllowedSources) == 0 {
		log.Info("WARNING: --allowed-sources is empty: volumes may fetch from any URL (inline volumes can point anywhere)")
	}
	st, err := fetch.Open(ctx, c.StoreDir, c.Store)
	if err != nil {
		return err
	}
	defer st.Close()
	if c.Driver.NodeID == "" {
		if c.Driver.NodeID, err = os.Hostname(); err != nil {
			return fmt.Errorf("node id: %w", err)
		}
	}
	// /healthz calls Probe over the CSI socket, as the kubelet reaches it.
	dopts := []driver.Option{driver.WithHealthEndpoint(c.Endpoint)}
	// Pod events: to the API server with the in-cluster config, or to the
	// log only. The driver owns the recorder and shuts it down on Close.
	switch rec, err := driver.NewInClusterRecorder(ctx, c.Driver.DriverName, c.Driver.NodeID); {
	case err == nil:
		dopts = append(dopts, driver.WithEventRecorder(rec))
		log.Info("Posting pod events to the API server (RBAC: create and patch on events)")
	case errors.Is(err, driver.ErrNotInCluster):
		log.Info("Pod events go to the log only", "reason", err.Error())
	default:
		log.Error(err, "Pod events go to the log only")
	}
	m := driver.NewMetrics(nil)
	dopts = append(dopts, driver.WithMetrics(m))
	if c.Trust.PolicyFile != "" {
		w, err := trust.NewWatcher(c.Trust.PolicyFile)
		if err != nil {
			return fmt.Errorf("--trust-policy: %w", err)
		}
		w.OnReload = m.PolicyReloaded
		dopts = append(dopts, driver.WithTrustPolicy(w))
		go w.Run(ctx, c.Trust.Poll)
		log.Info("Trust policy in force", "path", w.Path(), "policy", w.Policy().Digest, "rules", len(w.Policy().Rules()))
	} else {
		log.Info("No --trust-policy: image signatures are not checked")
	}
	d, err := driver.New(c.Driver, st, dopts...)
	if err != nil {
		return err
	}
	defer d.Close()

	var hsrv *http.Server
	if c.MetricsAddr != "" {
		hl, err := net.Listen("tcp", c.MetricsAddr)
		if err != nil {
			return fmt.Errorf("--metrics-address: %w", err)
		}
		hsrv = &http.Server{Handler: d.HTTPHandler(), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := hsrv.Serve(hl); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error(err, "Metrics server stopped")
			}
		}()
		defer hsrv.Close()
	}
	// The socket is served before recovery ends so that the registrar and
	// the liveness probe get answers; Probe says not ready until then and
	// publishes answer Unavailable (kubelet retries).
	l, err := driver.Listen(c.Endpoint)
	if err != nil {
		return err
	}
	gs := d.NewGRPCServer()
	served := make(chan error, 1)
	go func() { served <- gs.Serve(l) }()
	// Registration with the kubelet (builtin): the kubelet then calls
	// NodeGetInfo, which answers before recovery ends.
	regCtx, stopReg := context.WithCancel(ctx)
	defer stopReg()
	var registered chan error // nil without registration: never ready
	if c.Registration.Enabled {
		reg, err := driver.NewRegistrar(c.Driver.DriverName, c.Registration)
		if err != nil {
			gs.Stop()
			return err
		}
		registered = make(chan error, 1)
		go func() { registered <- reg.Run(regCtx) }()
		log.Info("Registering with the kubelet", "socket", c.Registration.Socket, "endpoint", c.Registration.Endpoint)
	}
	if err := d.Recover(ctx); err != nil {
		gs.Stop()
		return err
	}
	log.Info("Serving", "nodeID", d.Config().NodeID, "fsVerity", st.VerityEnabled())
	select {
	case err := <-served:
		return fmt.Errorf("serving %s: %w", c.Endpoint, err)
	case err := <-registered: // fails only making its first socket
		registered = nil
		if err != nil {
			gs.Stop()
			return err
		}
	case <-ctx.Done():
	}
	// The registration socket goes first: the kubelet unregisters the
	// plugin until the next one registers.
	stopReg()
	if registered != nil {
		<-registered
	}
	log.Info("Stopping; mounts stay in place")
	stopped := make(chan struct{})
	go func() { gs.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		gs.Stop()
	}
	return nil
}
