package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/driver"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

func newServeCmd() *cobra.Command {
	var (
		endpoint, nodeID, driverName, allowed string
		storeDir, storeMaxSize, minVerity     string
		metricsAddr                           string
		extraDirs                             []string
		fetchConcurrency                      int
		gcInterval, gcGrace, verifyInterval   time.Duration
		limits                                limitFlags
		trustShared, allowNonCanonical        bool
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the CSI node plugin (Identity and Node services) on a unix socket",
		Long: `Run the CSI node plugin (Identity and Node services) on a unix socket.

Fetch and verification failures are posted as Kubernetes events on the pod
(the CSIDriver needs podInfoOnMount: true) when the plugin runs with an
in-cluster config; the service account then needs RBAC verbs create and
patch on events (core API group). Without an in-cluster config events go
to the log only.`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, _, err := driver.ParseEndpoint(endpoint); err != nil {
				return usageErrorf("--endpoint: %v", err)
			}
			al, err := driver.ParseAllowList(allowed)
			if err != nil {
				return usageErrorf("--allowed-sources: %v", err)
			}
			floor, err := cfs.ParseVerityMode(minVerity)
			if err != nil {
				return usageErrorf("--min-verity: %v", err)
			}
			maxSize, err := parseSize(storeMaxSize)
			if err != nil {
				return usageErrorf("--store-max-size: %v", err)
			}
			if fetchConcurrency <= 0 {
				return usageErrorf("--fetch-concurrency must be positive")
			}
			if gcInterval < 0 {
				return usageErrorf("--gc-interval must not be negative")
			}
			if gcGrace < 0 {
				return usageErrorf("--gc-grace must not be negative")
			}
			grace := gcGrace
			if grace == 0 {
				grace = -1 // none
			}
			if verifyInterval < 0 {
				return usageErrorf("--verify-interval must not be negative")
			}
			so := fetch.Options{ExtraObjectDirs: extraDirs, Parallelism: fetchConcurrency, MaxSize: maxSize, GCGrace: grace,
				AllowNonCanonicalImages: allowNonCanonical}
			if err := limits.apply(&so); err != nil {
				return err
			}
			return serve(cmd.Context(), serveConfig{
				endpoint: endpoint, metricsAddr: metricsAddr,
				store:    so,
				storeDir: storeDir,
				driver: driver.Config{DriverName: driverName, Version: version, NodeID: nodeID,
					AllowedSources: al, MinVerity: floor, ExtraObjectDirs: extraDirs, GCInterval: gcInterval, VerifyInterval: verifyInterval,
					TrustSharedContent: trustShared},
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint (unix:///path/csi.sock)")
	f.StringVar(&nodeID, "node-id", "", "node id reported to kubelet (default: the host name)")
	f.StringVar(&driverName, "driver-name", driver.DefaultDriverName, "CSI plugin name")
	f.StringVar(&allowed, "allowed-sources", "", "comma-separated URL prefixes volumes may fetch from (empty allows all)")
	f.StringVar(&storeDir, "store-dir", fetch.DefaultStoreDir, "the node store directory")
	f.StringVar(&storeMaxSize, "store-max-size", "0", "size budget of the store for GC (bytes, or with K/M/G/T; 0 = none)")
	f.StringArrayVar(&extraDirs, "extra-object-dir", nil, "read-only object directory used before fetching (repeatable)")
	f.IntVar(&fetchConcurrency, "fetch-concurrency", 16, "concurrent object downloads per image")
	f.StringVar(&minVerity, "min-verity", "off", "the weakest verity mode a volume may ask for: off, userspace or require")
	f.StringVar(&metricsAddr, "metrics-address", ":9810", "address of /metrics, /healthz and /readyz (empty = off)")
	f.DurationVar(&gcInterval, "gc-interval", 10*time.Minute, "how often the store is garbage collected (0 = never)")
	f.DurationVar(&gcGrace, "gc-grace", 10*time.Minute, "images used within that long are kept by GC even when no volume uses them (0 = none)")
	f.DurationVar(&verifyInterval, "verify-interval", 24*time.Hour, "how often every object and image is re-hashed; corrupt files go to quarantine/ and their volumes report abnormal (0 = never)")
	f.BoolVar(&trustShared, "trust-shared-content", false, "serve content already on the node to any volume that names it, without its source showing that it holds it (single-tenant clusters only: any pod can then read any other pod's content by digest)")
	f.BoolVar(&allowNonCanonical, "allow-noncanonical-images", false, "accept images whose bytes are not what this project's writer makes of their tree (images from writers other than mkcomposefs 1.0.8, composefs-rs V1 and csi-composefs); off, every image is parsed and written again before its first use and refused unless identical, so the kernel's EROFS parser reads no crafted bytes")
	limits.add(f)
	gfs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(gfs)
	f.AddGoFlagSet(gfs)
	return cmd
}

type serveConfig struct {
	endpoint, metricsAddr, storeDir string
	store                           fetch.Options
	driver                          driver.Config
}

func serve(ctx context.Context, c serveConfig) error {
	log := klog.Background()
	ctx = klog.NewContext(ctx, log)
	log.Info("Starting csi-composefs", "version", version, "driver", c.driver.DriverName, "endpoint", c.endpoint, "store", c.storeDir)
	if c.driver.TrustSharedContent {
		log.Info("WARNING: --trust-shared-content: content on this node serves every volume that names it; sources are not asked to show that they hold it")
	}
	if c.store.AllowNonCanonicalImages {
		log.Info("WARNING: --allow-noncanonical-images: images from any writer reach the kernel's EROFS parser (crafted images too)")
	}
	if len(c.driver.AllowedSources) == 0 {
		log.Info("WARNING: --allowed-sources is empty: volumes may fetch from any URL (inline volumes can point anywhere)")
	}
	st, err := fetch.Open(ctx, c.storeDir, c.store)
	if err != nil {
		return err
	}
	defer st.Close()
	if c.driver.NodeID == "" {
		if c.driver.NodeID, err = os.Hostname(); err != nil {
			return fmt.Errorf("node id: %w", err)
		}
	}
	var dopts []driver.Option
	// Pod events: through client-go with the in-cluster config, or to the
	// log only. The driver owns the recorder and shuts it down on Close.
	switch rec, err := driver.NewInClusterRecorder(ctx, c.driver.DriverName, c.driver.NodeID); {
	case err == nil:
		dopts = append(dopts, driver.WithEventRecorder(rec))
		log.Info("Posting pod events to the API server (RBAC: create and patch on events)")
	case errors.Is(err, driver.ErrNotInCluster):
		log.Info("Pod events go to the log only", "reason", err.Error())
	default:
		log.Error(err, "Pod events go to the log only")
	}
	d, err := driver.New(c.driver, st, dopts...)
	if err != nil {
		return err
	}
	defer d.Close()

	var hsrv *http.Server
	if c.metricsAddr != "" {
		hl, err := net.Listen("tcp", c.metricsAddr)
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
	l, err := driver.Listen(c.endpoint)
	if err != nil {
		return err
	}
	gs := d.NewGRPCServer()
	served := make(chan error, 1)
	go func() { served <- gs.Serve(l) }()
	if err := d.Recover(ctx); err != nil {
		gs.Stop()
		return err
	}
	log.Info("Serving", "nodeID", d.Config().NodeID, "fsVerity", st.VerityEnabled())
	select {
	case err := <-served:
		return fmt.Errorf("serving %s: %w", c.endpoint, err)
	case <-ctx.Done():
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
