// Package app holds the flags of `csi-composefs serve` and their checks.
//
// It is a package of its own, not part of package main, so that code outside
// the binary can parse arguments with the binary's own flag set: the
// deployment tests (a separate module under test/) parse every argument of
// the rendered DaemonSet with NewServeCommand. Go cannot import a main
// package, and a separate module cannot import internal/ packages, so this
// package is exported; it holds no serving logic.
package app

import (
	"context"
	"flag"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/driver"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// ServeConfig is what `serve` runs with, every flag checked.
type ServeConfig struct {
	Endpoint    string // CSI endpoint (unix:///path or tcp://host:port)
	MetricsAddr string // address of /metrics, /healthz and /readyz; "" = off
	StoreDir    string
	Store       fetch.Options
	Driver      driver.Config
	// Registration says how the plugin registers with the kubelet.
	Registration driver.RegistrationConfig
	// Trust is the trust policy setting (image signatures).
	Trust TrustConfig
}

// Command is what NewServeCommand needs from the binary.
type Command struct {
	// Version is the binary's version (reported to kubelet).
	Version string
	// UsageErrorf makes the error of a wrong flag (the binary maps it to
	// its usage exit status); nil means fmt.Errorf.
	UsageErrorf func(format string, args ...any) error
	// Run serves with the checked configuration.
	Run func(context.Context, ServeConfig) error
}

// Registration modes of --registration.
const (
	RegistrationBuiltin = "builtin" // serve the kubelet plugin-registration API
	RegistrationNone    = "none"    // a node-driver-registrar sidecar registers
)

// DefaultKubeletRoot is the kubelet's default --root-dir.
const DefaultKubeletRoot = "/var/lib/kubelet"

// NewServeCommand returns the serve command.
func NewServeCommand(c Command) *cobra.Command {
	usagef := c.UsageErrorf
	if usagef == nil {
		usagef = fmt.Errorf
	}
	var (
		endpoint, nodeID, driverName, allowed string
		storeDir, storeMaxSize, minVerity     string
		metricsAddr                           string
		kubeletRoot, registration, regPath    string
		extraDirs                             []string
		fetchConcurrency, maxDownloads        int
		gcInterval, gcGrace, verifyInterval   time.Duration
		limits                                limitFlags
		trustf                                trustFlags
		trustShared, allowNonCanonical        bool
		insecureRegs, mirrors                 []string
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the CSI node plugin (Identity and Node services) on a unix socket",
		Long: `Run the CSI node plugin (Identity and Node services) on a unix socket.

With --registration=builtin (the default) the plugin also registers itself
with the kubelet: it serves the kubelet plugin-registration API on
KUBELET-ROOT/plugins_registry/DRIVER-NAME-reg.sock, so no
node-driver-registrar sidecar is needed. Sockets are created with mode 0600.

Fetch and verification failures are posted as Kubernetes events on the pod
(the CSIDriver needs podInfoOnMount: true) when the plugin runs with an
in-cluster config; the service account then needs RBAC verbs create and
patch on events (core API group). Without an in-cluster config events go
to the log only.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 0 {
				return usagef("%s: want 0 argument(s), got %d", cmd.CommandPath(), len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			network, _, err := driver.ParseEndpoint(endpoint)
			if err != nil {
				return usagef("--endpoint: %v", err)
			}
			if err := driver.CheckDriverName(driverName); err != nil {
				return usagef("--driver-name: %v", err)
			}
			al, err := driver.ParseAllowList(allowed)
			if err != nil {
				return usagef("--allowed-sources: %v", err)
			}
			floor, err := cfs.ParseVerityMode(minVerity)
			if err != nil {
				return usagef("--min-verity: %v", err)
			}
			maxSize, err := ParseSize(storeMaxSize)
			if err != nil {
				return usagef("--store-max-size: %v", err)
			}
			if fetchConcurrency <= 0 {
				return usagef("--fetch-concurrency must be positive")
			}
			if maxDownloads <= 0 {
				return usagef("--max-downloads must be positive")
			}
			if gcInterval < 0 {
				return usagef("--gc-interval must not be negative")
			}
			if gcGrace < 0 {
				return usagef("--gc-grace must not be negative")
			}
			grace := gcGrace
			if grace == 0 {
				grace = -1 // none
			}
			if verifyInterval < 0 {
				return usagef("--verify-interval must not be negative")
			}
			mirrorMap, err := ParseMirrors(mirrors)
			if err != nil {
				return usagef("--registry-mirror: %v", err)
			}
			so := fetch.Options{ExtraObjectDirs: extraDirs, Parallelism: fetchConcurrency, MaxConcurrentDownloads: maxDownloads, MaxSize: maxSize, GCGrace: grace,
				AllowNonCanonicalImages: allowNonCanonical}
			if err := limits.apply(&so, usagef); err != nil {
				return err
			}
			tc, err := trustf.apply(usagef)
			if err != nil {
				return err
			}
			if !filepath.IsAbs(kubeletRoot) {
				return usagef("--kubelet-root %q must be an absolute path", kubeletRoot)
			}
			reg := driver.RegistrationConfig{}
			switch registration {
			case RegistrationBuiltin:
				reg.Socket = filepath.Join(kubeletRoot, "plugins_registry", driverName+"-reg.sock")
				reg.Endpoint = filepath.Join(kubeletRoot, "plugins", driverName, "csi.sock")
				if regPath != "" {
					if !filepath.IsAbs(regPath) {
						return usagef("--kubelet-registration-path %q must be an absolute path", regPath)
					}
					reg.Endpoint = filepath.Clean(regPath)
				}
				if network != "unix" {
					return usagef("--registration=builtin needs a unix --endpoint (the kubelet dials a socket path), got %s", endpoint)
				}
				reg.Enabled = true
			case RegistrationNone:
				if regPath != "" {
					return usagef("--kubelet-registration-path is only used with --registration=builtin")
				}
			default:
				return usagef("--registration: want %s or %s, got %q", RegistrationBuiltin, RegistrationNone, registration)
			}
			return c.Run(cmd.Context(), ServeConfig{
				Endpoint: endpoint, MetricsAddr: metricsAddr,
				Store:        so,
				StoreDir:     storeDir,
				Registration: reg,
				Trust:        tc,
				Driver: driver.Config{DriverName: driverName, Version: c.Version, NodeID: nodeID,
					AllowedSources: al, MinVerity: floor, ExtraObjectDirs: extraDirs, GCInterval: gcInterval, VerifyInterval: verifyInterval,
					TrustSharedContent: trustShared,
					Registries:         driver.RegistryConfig{Insecure: insecureRegs, Mirrors: mirrorMap}},
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
	f.IntVar(&fetchConcurrency, "fetch-concurrency", 256, "most concurrent object downloads per image (from 16, doubling while the throughput grows)")
	f.IntVar(&maxDownloads, "max-downloads", 256, "most concurrent object downloads of all volumes together (node-wide; bounds the download buffers and, at 4 per download, the fetch goroutines)")
	f.StringVar(&minVerity, "min-verity", "off", "the weakest verity mode a volume may ask for: off, userspace or require")
	f.StringVar(&metricsAddr, "metrics-address", ":9810", "address of /metrics, /healthz and /readyz (empty = off)")
	f.DurationVar(&gcInterval, "gc-interval", 10*time.Minute, "how often the store is garbage collected (0 = never)")
	f.DurationVar(&gcGrace, "gc-grace", 10*time.Minute, "images used within that long are kept by GC even when no volume uses them (0 = none)")
	f.DurationVar(&verifyInterval, "verify-interval", 24*time.Hour, "how often every object and image is re-hashed; corrupt files go to quarantine/ and their volumes report abnormal (0 = never)")
	f.BoolVar(&trustShared, "trust-shared-content", false, "serve content already on the node to any volume that names it, without its source showing that it holds it (single-tenant clusters only: any pod can then read any other pod's content by digest)")
	f.BoolVar(&allowNonCanonical, "allow-noncanonical-images", false, "accept images whose bytes are not what this project's writer makes of their tree (images from writers other than mkcomposefs 1.0.8, composefs-rs V1 and csi-composefs); off, every image is parsed and written again before its first use and refused unless identical, so the kernel's EROFS parser reads no crafted bytes")
	f.StringArrayVar(&insecureRegs, "insecure-registry", nil, "registry HOST[:PORT] (or pattern) reached over plain HTTP (repeatable; tests and local registries)")
	f.StringArrayVar(&mirrors, "registry-mirror", nil, "REGISTRY=URL: a mirror tried first for the blobs of REGISTRY (repeatable, in order; containerd hosts.toml mirrors); manifests always come from REGISTRY with the volume's credentials")
	limits.add(f)
	trustf.add(f)
	f.StringVar(&kubeletRoot, "kubelet-root", DefaultKubeletRoot, "the kubelet's root directory (its --root-dir) as this process sees it")
	f.StringVar(&registration, "registration", RegistrationBuiltin, "how the plugin registers with the kubelet: builtin (serve KUBELET-ROOT/plugins_registry/DRIVER-NAME-reg.sock) or none (a node-driver-registrar sidecar does it)")
	f.StringVar(&regPath, "kubelet-registration-path", "", "the CSI socket's path as the kubelet sees it on the host, when it differs from this process's view (default KUBELET-ROOT/plugins/DRIVER-NAME/csi.sock)")
	gfs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(gfs)
	f.AddGoFlagSet(gfs)
	return cmd
}

// ParseSize parses "123", "10K", "512M", "1G", "2T" (powers of 1024).
func ParseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	mult := int64(1)
	if s != "" {
		switch strings.ToUpper(s[len(s)-1:]) {
		case "K":
			mult = 1 << 10
		case "M":
			mult = 1 << 20
		case "G":
			mult = 1 << 30
		case "T":
			mult = 1 << 40
		}
		if mult > 1 {
			s = s[:len(s)-1]
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	return n * mult, nil
}

// ParseMirrors reads REGISTRY=URL flags into the mirror lists of each
// registry, in order.
func ParseMirrors(flags []string) (map[string][]string, error) {
	m := make(map[string][]string)
	for _, f := range flags {
		reg, u, ok := strings.Cut(f, "=")
		if !ok || reg == "" || !(strings.HasPrefix(u, "https://") || strings.HasPrefix(u, "http://")) {
			return nil, fmt.Errorf("%q: want REGISTRY=https://MIRROR[:PORT]", f)
		}
		reg = strings.ToLower(reg)
		m[reg] = append(m[reg], strings.TrimSuffix(u, "/"))
	}
	return m, nil
}
