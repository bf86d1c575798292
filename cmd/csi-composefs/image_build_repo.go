package main

import (
	"context"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// buildIntoRepo is `image build --repo REPO --name NAME SRC`: it writes the
// image of the directory src to REPO/images/NAME (and REPO/images/<digest>)
// and its objects, deduplicated against what REPO has, to REPO/objects.
func buildIntoRepo(ctx context.Context, src, repo, name string, dirOpts cfs.DirOptions, opts cfs.WriteOptions) (cfs.Digest, error) {
	if err := fetch.ValidImageName(name); err != nil {
		return cfs.Digest{}, usageError{err}
	}
	return fetch.PublishImage(ctx, src, repo, name, dirOpts, opts)
}
