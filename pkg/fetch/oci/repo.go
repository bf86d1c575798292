package oci

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// RepoSource is a registry repository with one set of credentials: the
// source the driver keeps per volume source. It serves nothing itself:
// BindRef gives the source of one reference (an ArtifactSource for oci://,
// an ImageSource for docker://), kept so that volumes of the same
// reference share its resolved artifact.
type RepoSource struct {
	c    *Client
	repo Reference // without tag or digest

	mu    sync.Mutex
	bound map[string]fetch.Source
}

var (
	_ fetch.Source    = (*RepoSource)(nil)
	_ fetch.RefBinder = (*RepoSource)(nil)
)

// NewRepoSource makes the source of the repository repo names (its tag or
// digest is ignored).
func NewRepoSource(repo Reference, opts Options) (*RepoSource, error) {
	repo.Tag, repo.Digest = "", ""
	c, err := NewClient(repo, opts)
	if err != nil {
		return nil, err
	}
	return &RepoSource{c: c, repo: repo, bound: make(map[string]fetch.Source)}, nil
}

// String names the repository.
func (r *RepoSource) String() string { return r.repo.Repo() }

// CloseIdleConnections closes the client's idle connections.
func (r *RepoSource) CloseIdleConnections() { r.c.CloseIdleConnections() }

// BindRef returns the source of the reference ref.Name names (a tag or a
// manifest digest) in the repository.
func (r *RepoSource) BindRef(ref fetch.ImageRef) (fetch.Source, error) {
	name := ref.Name
	if name == "" {
		return nil, errors.New("an OCI reference needs a tag or a manifest digest")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if s, ok := r.bound[name]; ok {
		return s, nil
	}
	full, err := r.repo.WithName(name)
	if err != nil {
		return nil, fmt.Errorf("reference %s: %w", r.repo.Repo(), err)
	}
	var s fetch.Source
	switch r.repo.Scheme {
	case SchemeArtifact:
		s = NewArtifactSource(r.c, full)
	default:
		s = NewImageSource(r.c, full, r.c.opts.Convert)
	}
	if len(r.bound) >= 256 {
		clear(r.bound)
	}
	r.bound[name] = s
	return s, nil
}

func (r *RepoSource) unbound() error {
	return fmt.Errorf("internal error: %s used without a reference (fetch.BindRef)", r)
}

// OpenImage fails: use BindRef.
func (r *RepoSource) OpenImage(context.Context, fetch.ImageRef) (io.ReadCloser, int64, error) {
	return nil, 0, r.unbound()
}

// OpenObject fails: use BindRef.
func (r *RepoSource) OpenObject(context.Context, cfs.Digest, uint64) (io.ReadCloser, error) {
	return nil, r.unbound()
}
