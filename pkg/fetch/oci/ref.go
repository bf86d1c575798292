package oci

import (
	"fmt"
	"strings"

	"github.com/opencontainers/go-digest"
	"oras.land/oras-go/v2/registry"
)

// Schemes of registry references.
const (
	// SchemeArtifact names a composefs artifact: oci://REGISTRY/REPO:TAG.
	SchemeArtifact = "oci"
	// SchemeImage names a plain container image: docker://REGISTRY/REPO:TAG.
	SchemeImage = "docker"
)

// dockerHub is Docker Hub's name in references and its API host.
const (
	dockerHub        = "docker.io"
	dockerHubAPIHost = "registry-1.docker.io"
)

// Reference is a parsed oci:// or docker:// reference.
type Reference struct {
	Scheme     string // SchemeArtifact or SchemeImage
	Registry   string // host[:port], lower case
	Repository string
	// Tag or Digest (a manifest digest, "sha256:…"): at least one is set;
	// with both, the digest is what is fetched and the tag is informative.
	Tag    string
	Digest digest.Digest
}

// ParseReference parses SCHEME://REGISTRY/REPO[:TAG][@sha256:HEX]. For
// docker://, a first component that is not a host (no dot or colon, not
// localhost) means Docker Hub, and a single-component Hub name gets
// library/, as docker pull does; oci:// needs the registry spelled out.
// A reference without tag or digest means the tag latest.
func ParseReference(s string) (Reference, error) {
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok || (scheme != SchemeArtifact && scheme != SchemeImage) {
		return Reference{}, fmt.Errorf("reference %q: want oci://REGISTRY/REPO:TAG or docker://REGISTRY/REPO:TAG", truncate(s))
	}
	r := Reference{Scheme: scheme}
	name, dg, hasDigest := strings.Cut(rest, "@")
	if hasDigest {
		d, err := digest.Parse(dg)
		if err != nil || d.Algorithm() != digest.SHA256 {
			return Reference{}, fmt.Errorf("reference %q: the digest must be sha256:<64 hex>", truncate(s))
		}
		r.Digest = d
	}
	// The tag is after the last colon that follows the last slash.
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		r.Tag, name = name[i+1:], name[:i]
	}
	host, repo, ok := strings.Cut(name, "/")
	isHost := ok && (strings.ContainsAny(host, ".:") || host == "localhost")
	switch {
	case isHost:
	case scheme == SchemeImage:
		host, repo = dockerHub, name
	default:
		return Reference{}, fmt.Errorf("reference %q: name the registry (oci://REGISTRY/REPO:TAG)", truncate(s))
	}
	host = strings.ToLower(host)
	if host == "index.docker.io" || host == dockerHubAPIHost {
		host = dockerHub
	}
	if host == dockerHub && !strings.Contains(repo, "/") {
		repo = "library/" + repo
	}
	r.Registry, r.Repository = host, repo
	if r.Tag == "" && r.Digest == "" {
		r.Tag = "latest"
	}
	// oras-go's grammar (the distribution spec's) checks every part.
	check := registry.Reference{Registry: r.Registry, Repository: r.Repository, Reference: r.Tag}
	if err := check.ValidateRegistry(); err != nil {
		return Reference{}, fmt.Errorf("reference %q: %w", truncate(s), err)
	}
	if err := check.ValidateRepository(); err != nil {
		return Reference{}, fmt.Errorf("reference %q: %w", truncate(s), err)
	}
	if r.Tag != "" {
		if err := check.ValidateReferenceAsTag(); err != nil {
			return Reference{}, fmt.Errorf("reference %q: %w", truncate(s), err)
		}
	}
	return r, nil
}

// Repo returns SCHEME://REGISTRY/REPO, the reference without tag or digest
// (what the driver's allow-list matches).
func (r Reference) Repo() string { return r.Scheme + "://" + r.Registry + "/" + r.Repository }

// Name returns what is fetched: the digest when set, else the tag.
func (r Reference) Name() string {
	if r.Digest != "" {
		return r.Digest.String()
	}
	return r.Tag
}

// String returns the canonical reference.
func (r Reference) String() string {
	s := r.Repo()
	if r.Tag != "" {
		s += ":" + r.Tag
	}
	if r.Digest != "" {
		s += "@" + r.Digest.String()
	}
	return s
}

// WithName returns r naming name instead (a tag, or a digest "sha256:…").
func (r Reference) WithName(name string) (Reference, error) {
	r.Tag, r.Digest = "", ""
	if strings.HasPrefix(name, "sha256:") {
		d, err := digest.Parse(name)
		if err != nil {
			return Reference{}, fmt.Errorf("digest %q: %w", truncate(name), err)
		}
		r.Digest = d
		return r, nil
	}
	check := registry.Reference{Registry: r.Registry, Repository: r.Repository, Reference: name}
	if err := check.ValidateReferenceAsTag(); err != nil {
		return Reference{}, err
	}
	r.Tag = name
	return r, nil
}

// apiHost is the host the registry's API is served on.
func (r Reference) apiHost() string {
	if r.Registry == dockerHub {
		return dockerHubAPIHost
	}
	return r.Registry
}
