// Command image builds the csi-composefs plugin image without a container
// engine: an OCI image layout with a multi-arch index, and a docker-save
// tarball per platform (what `ctr -n k8s.io images import` and
// `docker load` take). The image holds the static binary and CA
// certificates only; the same inputs and SOURCE_DATE_EPOCH give the same
// bytes and digests.
//
//	go run . -ref REPO:TAG -out DIR -binary linux/amd64=PATH [-binary linux/arm64=PATH]...
//	go run . -ca-bundle FILE    # write the CA bundle only (the Dockerfile's build stage)
//
// It is a module of its own so that the product's go.mod does not depend on
// an image library for a build step.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

type binaryFlags map[string]string

func (b binaryFlags) String() string { return fmt.Sprint(map[string]string(b)) }

func (b binaryFlags) Set(v string) error {
	p, path, ok := strings.Cut(v, "=")
	if !ok || p == "" || path == "" {
		return fmt.Errorf("want PLATFORM=PATH (linux/amd64=bin/csi-composefs), got %q", v)
	}
	if _, dup := b[p]; dup {
		return fmt.Errorf("platform %s given twice", p)
	}
	b[p] = path
	return nil
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("image", flag.ContinueOnError)
	bins := binaryFlags{}
	fs.Var(bins, "binary", "PLATFORM=PATH of a static binary (repeatable)")
	ref := fs.String("ref", "", "image reference REPOSITORY:TAG")
	out := fs.String("out", "_output/image", "output directory (replaced)")
	version := fs.String("version", "", "version label (default: the tag)")
	revision := fs.String("revision", "", "source revision label")
	caOnly := fs.String("ca-bundle", "", "only write the CA bundle to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *caOnly != "" {
		b, err := CABundle()
		if err != nil {
			return err
		}
		return os.WriteFile(*caOnly, b, 0o644)
	}
	created, err := sourceDateEpoch()
	if err != nil {
		return err
	}
	if *version == "" {
		if _, tag, ok := strings.Cut(*ref, ":"); ok {
			*version = tag
		}
	}
	res, err := Build(Spec{Binaries: bins, Ref: *ref, Version: *version, Revision: *revision, Created: created, Out: *out})
	if err != nil {
		return err
	}
	fmt.Printf("image %s (created %s)\n", *ref, created.UTC().Format(time.RFC3339))
	fmt.Printf("index %s in OCI layout %s\n", res.Index, res.Layout)
	platforms := make([]string, 0, len(res.Manifests))
	for p := range res.Manifests {
		platforms = append(platforms, p)
	}
	sort.Strings(platforms)
	for _, p := range platforms {
		fmt.Printf("%-12s manifest %s, tarball %s\n", p, res.Manifests[p], res.Tarballs[p])
	}
	// The digest to compare between builds (make image-check).
	return os.WriteFile(filepath.Join(*out, "digest"), []byte(res.Index.String()+"\n"), 0o644)
}

// sourceDateEpoch is the time of SOURCE_DATE_EPOCH (seconds), or the Unix
// epoch when unset.
func sourceDateEpoch() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q: want seconds since 1970", s)
	}
	return time.Unix(n, 0).UTC(), nil
}
