package main

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/csi-composefs/csi-composefs/test/e2e/cluster/internal/helmops"
	"github.com/csi-composefs/csi-composefs/test/e2e/cluster/internal/localcluster"
)

// install imports the plugin image into the local cluster's containerd
// and installs the chart with the Helm SDK, as a user would with
// `helm install`, plus the values this cluster needs (its kubelet root,
// the store in the work directory, the test repository allowed).
func install(ctx context.Context, work string, fs *flag.FlagSet, args []string) error {
	kubeconfig := fs.String("kubeconfig", "", "cluster to install into (default: the local cluster's admin kubeconfig)")
	chart := fs.String("chart", "charts/csi-composefs", "the chart folder")
	image := fs.String("image", "", "the plugin image as a docker-save tarball (from make image); sets image.repository and image.tag")
	local := fs.Bool("local", true, "the local cluster: import the image into its containerd and set its kubelet root and store folder")
	release := fs.String("release", "csi-composefs", "Helm release name")
	namespace := fs.String("namespace", "csi-composefs", "Helm release namespace")
	var sets listFlag
	fs.Var(&sets, "set", "chart value, as helm --set (repeatable)")
	fs.Parse(args)

	var c *localcluster.Cluster
	if *local {
		var err error
		if c, err = localcluster.New(work, ""); err != nil {
			return err
		}
		if *kubeconfig == "" {
			*kubeconfig = c.AdminKubeconfig()
		}
	}
	if *kubeconfig == "" {
		*kubeconfig = os.Getenv("KUBECONFIG")
	}
	vals := map[string]any{}
	var pre []string
	if *image != "" {
		ref, err := imageRef(*image)
		if err != nil {
			return err
		}
		repo, tag, ok := cutTag(ref)
		if !ok {
			return fmt.Errorf("image %s: tag %q has no :tag", *image, ref)
		}
		if c != nil {
			if err := c.ImportImages(ctx, *image); err != nil {
				return err
			}
		}
		// As strings: a commit's short hash may be digits only.
		if err := helmops.ParseSetString(vals, "image.repository="+repo, "image.tag="+tag, "image.pullPolicy=IfNotPresent"); err != nil {
			return err
		}
	}
	if c != nil {
		pre = append(pre, localValues(c)...)
	}
	if err := helmops.ParseSet(vals, append(pre, sets...)...); err != nil {
		return err
	}
	start := time.Now()
	rel := helmops.Release{Kubeconfig: *kubeconfig, Namespace: *namespace, Name: *release}
	if err := rel.Install(ctx, *chart, vals); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "install: release %s in namespace %s ready in %s\n", *release, *namespace, time.Since(start).Round(100*time.Millisecond))
	return nil
}

// localValues are the chart values the local cluster needs: its kubelet
// root and the store inside the work directory (nothing outside it is
// changed), and the plugin's HTTP endpoints on loopback only.
func localValues(c *localcluster.Cluster) []string {
	return []string{
		"kubeletDir=" + c.KubeletRoot(),
		"store.hostPath=" + c.StoreDir(),
	}
}

// imageRef reads the first repository tag of a docker-save tarball.
func imageRef(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return "", fmt.Errorf("%s: no manifest.json (not a docker-save tarball)", path)
		}
		if err != nil {
			return "", fmt.Errorf("%s: %w", path, err)
		}
		if filepath.Clean(h.Name) != "manifest.json" {
			continue
		}
		var m []struct{ RepoTags []string }
		if err := json.NewDecoder(tr).Decode(&m); err != nil {
			return "", fmt.Errorf("%s: manifest.json: %w", path, err)
		}
		if len(m) == 0 || len(m[0].RepoTags) == 0 {
			return "", fmt.Errorf("%s: the image has no tag", path)
		}
		return m[0].RepoTags[0], nil
	}
}

// cutTag splits repo:tag (a registry port is not a tag).
func cutTag(ref string) (repo, tag string, ok bool) {
	i := strings.LastIndexByte(ref, ':')
	if i < 0 || strings.Contains(ref[i:], "/") {
		return ref, "", false
	}
	return ref[:i], ref[i+1:], true
}
