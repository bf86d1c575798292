// Command e2e-cluster runs the local single-node Kubernetes cluster the
// end-to-end suite uses, built from parts on this host:
//
//	e2e-cluster build                 build (or find cached) the Kubernetes binaries
//	e2e-cluster up --pause-bin P [--image TAR]...
//	e2e-cluster down                  stop it and undo its changes to the host (idempotent)
//	e2e-cluster install --chart DIR --image TAR [--set k=v]...
//	e2e-cluster images --out DIR      write the test pods' busybox image (docker-save tarball)
//	e2e-cluster env                   print KUBECONFIG and PATH (kubectl) for the local cluster
//	e2e-cluster serve --dir D         serve D over HTTP on 127.0.0.1 until down (the demo's repository)
//
// All state is in --work (default $E2E_WORK or /var/tmp/csi-composefs-e2e);
// the binaries are cached under $HOME/.cache/csi-composefs/k8s-<version>/.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/csi-composefs/csi-composefs/test/e2e/cluster/internal/k8sbin"
	"github.com/csi-composefs/csi-composefs/test/e2e/cluster/internal/localcluster"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func defaultWork() string {
	if w := os.Getenv("E2E_WORK"); w != "" {
		return w
	}
	return "/var/tmp/csi-composefs-e2e"
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd, args := os.Args[1], os.Args[2:]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	work := fs.String("work", defaultWork(), "the cluster's work directory (all its state)")
	var err error
	switch cmd {
	case "build":
		fs.Parse(args)
		_, err = builder(ctx)
	case "up":
		pause := fs.String("pause-bin", "", "static pause binary for the sandbox image (required)")
		var images listFlag
		fs.Var(&images, "image", "docker-save image tarball to import (repeatable)")
		fs.Parse(args)
		if *pause == "" {
			fmt.Fprintln(os.Stderr, "up: --pause-bin is required")
			os.Exit(2)
		}
		err = up(ctx, *work, *pause, images)
	case "down":
		fs.Parse(args)
		var c *localcluster.Cluster
		if c, err = cluster(ctx, *work, false); err == nil {
			err = c.Down(ctx)
		}
	case "svc-proxy":
		listen := fs.String("listen", "", "address to listen on")
		to := fs.String("to", "", "address to forward to")
		fs.Parse(args)
		err = localcluster.ServeProxy(ctx, *listen, *to)
	case "images":
		out := fs.String("out", ".", "folder to write busybox.tar (and pause.tar) into")
		pause := fs.String("pause-bin", "", "static pause binary (writes pause.tar too)")
		fs.Parse(args)
		err = localcluster.WriteBusyboxImage(filepath.Join(*out, "busybox.tar"))
		if err == nil && *pause != "" {
			err = localcluster.WritePauseImage(filepath.Join(*out, "pause.tar"), *pause)
		}
	case "install":
		err = install(ctx, *work, fs, args)
	case "env":
		fs.Parse(args)
		var b *k8sbin.Builder
		var c *localcluster.Cluster
		if b, err = builder(ctx); err == nil {
			if c, err = localcluster.New(*work, b.BinDir()); err == nil {
				fmt.Printf("export KUBECONFIG=%s\nexport PATH=%s:$PATH\n", c.AdminKubeconfig(), b.BinDir())
			}
		}
	case "serve":
		dir := fs.String("dir", "", "folder to serve (an HTTP repository)")
		listen := fs.String("listen", "127.0.0.1:18080", "address")
		fs.Parse(args)
		var c *localcluster.Cluster
		if c, err = localcluster.New(*work, ""); err == nil {
			err = c.StartRepoServer(*dir, *listen)
		}
	case "serve-dir":
		dir := fs.String("dir", "", "folder to serve")
		listen := fs.String("listen", "", "address")
		fs.Parse(args)
		err = localcluster.ServeDir(ctx, *dir, *listen)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e-cluster %s: %v\n", cmd, err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: e2e-cluster build|up|down|install|images|env|serve [flags]  (-h for a command's flags)")
	os.Exit(2)
}

func builder(ctx context.Context) (*k8sbin.Builder, error) {
	cache, err := k8sbin.DefaultCacheDir()
	if err != nil {
		return nil, err
	}
	b, err := k8sbin.New(cache, k8sbin.Version)
	if err != nil {
		return nil, err
	}
	return b, b.Ensure(ctx)
}

// cluster returns the cluster of work; with build it also makes sure the
// binaries are there (Down needs none of them).
func cluster(ctx context.Context, work string, build bool) (*localcluster.Cluster, error) {
	var bin string
	if build {
		b, err := builder(ctx)
		if err != nil {
			return nil, err
		}
		bin = b.BinDir()
	}
	return localcluster.New(work, bin)
}

func up(ctx context.Context, work, pause string, images []string) error {
	c, err := cluster(ctx, work, true)
	if err != nil {
		return err
	}
	if err := c.Down(ctx); err != nil {
		return fmt.Errorf("cleaning up before up: %w", err)
	}
	imgDir := filepath.Join(c.Work, "images")
	if err := os.MkdirAll(imgDir, 0o755); err != nil {
		return err
	}
	pauseTar, bbTar := filepath.Join(imgDir, "pause.tar"), filepath.Join(imgDir, "busybox.tar")
	if err := localcluster.WritePauseImage(pauseTar, pause); err != nil {
		return err
	}
	if err := localcluster.WriteBusyboxImage(bbTar); err != nil {
		return err
	}
	for _, t := range images {
		if _, err := os.Stat(t); err != nil {
			return fmt.Errorf("--image: %w", err)
		}
	}
	err = c.Up(ctx, append([]string{pauseTar, bbTar}, images...))
	if err != nil && errors.Is(ctx.Err(), context.Canceled) {
		err = fmt.Errorf("interrupted: %w (run down to clean up)", err)
	}
	return err
}
