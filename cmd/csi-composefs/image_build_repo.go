package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// buildIntoRepo is `image build --repo REPO --name NAME SRC`: it writes the
// image of the directory src to REPO/images/NAME (and REPO/images/<digest>)
// and its objects, deduplicated against what REPO has, to REPO/objects.
// An image of other content already named NAME stays unless force. With
// packs, its small objects are packed into REPO/packs/ too.
func buildIntoRepo(ctx context.Context, src, repo, name string, force bool, packs *fetch.PackOptions, dirOpts cfs.DirOptions, opts cfs.WriteOptions) (cfs.Digest, error) {
	if err := fetch.ValidImageName(name); err != nil {
		return cfs.Digest{}, usageError{err}
	}
	var popts []fetch.PublishOption
	if !force {
		popts = append(popts, fetch.KeepExisting())
	}
	if packs != nil {
		popts = append(popts, fetch.WithPacks(*packs))
	}
	d, err := fetch.PublishImage(ctx, src, repo, name, dirOpts, opts, popts...)
	if errors.Is(err, fetch.ErrImageExists) {
		return d, fmt.Errorf("%w; --force replaces it", err)
	}
	return d, err
}
