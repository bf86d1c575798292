package oci

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"k8s.io/klog/v2"
	"oras.land/oras-go/v2/errdef"
	"oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/credentials"
	"oras.land/oras-go/v2/registry/remote/errcode"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// Options configure how registries are reached (node and CLI alike).
type Options struct {
	// Insecure lists host[:port] patterns (path.Match syntax) reached over
	// plain HTTP (tests, local registries).
	Insecure []string
	// Mirrors maps a registry host to mirror URLs (https://host[:port]),
	// tried in order for blobs before the registry (containerd's hosts.toml
	// mirrors). Mirrors get no credentials. Manifests always come from the
	// registry itself, with the volume's credentials, so a mirror never
	// serves what the registry did not grant, and every blob a mirror
	// serves is checked against the digest the registry's manifest names.
	Mirrors map[string][]string
	// CA is a PEM bundle of extra trusted CAs.
	CA []byte
	// DockerConfig is a .dockerconfigjson (a Kubernetes pull secret).
	DockerConfig []byte
	// Username and Password (basic, or for a token service) and Token (a
	// registry access token) apply to the reference's registry; they win
	// over DockerConfig.
	Username, Password, Token string
	// UserAgent is sent with every request; "" = "csi-composefs".
	UserAgent string
	// Transport replaces the transport built from the options (tests).
	Transport http.RoundTripper
	// Convert bounds the conversion of container images.
	Convert ConvertLimits
}

// Client reaches one registry repository (and its mirrors) with one set of
// credentials. It is safe for concurrent use.
type Client struct {
	ref      Reference
	opts     Options
	http     *http.Client
	upstream *remote.Repository
	mirrors  []*remote.Repository
	authc    *auth.Client

	mu         sync.Mutex
	distrusted map[digest.Digest]bool // blobs a mirror served wrong: read from the registry
}

// maxDistrusted bounds the blobs a client remembers a mirror failed on.
const maxDistrusted = 4096

// NewClient makes a client for ref's repository.
func NewClient(ref Reference, opts Options) (*Client, error) {
	rt := opts.Transport
	if rt == nil {
		t, err := newTransport(opts.CA)
		if err != nil {
			return nil, err
		}
		rt = t
	}
	if opts.UserAgent == "" {
		opts.UserAgent = "csi-composefs"
	}
	hc := &http.Client{Transport: rt}
	cred, err := credentialFunc(ref, opts)
	if err != nil {
		return nil, err
	}
	c := &Client{ref: ref, opts: opts, http: hc, distrusted: make(map[digest.Digest]bool)}
	c.authc = &auth.Client{Client: hc, Credential: cred, Cache: auth.NewCache(), Header: http.Header{"User-Agent": {opts.UserAgent}}}
	if isLoopback(ref.Registry) {
		// A registry on loopback may have its token service there too.
		c.authc.BlockedRealmPrefixes = []netip.Prefix{}
	}
	c.upstream = c.repository(ref.apiHost(), c.authc)
	for _, m := range opts.Mirrors[ref.Registry] {
		u, err := url.Parse(m)
		if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
			return nil, fmt.Errorf("mirror %q of %s: want http(s)://HOST[:PORT]", m, ref.Registry)
		}
		anon := &auth.Client{Client: hc, Cache: auth.NewCache(), Header: c.authc.Header}
		r := c.repository(u.Host, anon)
		r.PlainHTTP = u.Scheme == "http"
		c.mirrors = append(c.mirrors, r)
	}
	return c, nil
}

func (c *Client) repository(host string, ac *auth.Client) *remote.Repository {
	return &remote.Repository{
		Client:             ac,
		Reference:          registry.Reference{Registry: host, Repository: c.ref.Repository},
		PlainHTTP:          c.insecure(host),
		ManifestMediaTypes: manifestMediaTypes,
		MaxMetadataBytes:   maxMetadataBytes,
	}
}

func (c *Client) insecure(host string) bool {
	for _, p := range c.opts.Insecure {
		if ok, _ := path.Match(p, host); ok {
			return true
		}
	}
	return false
}

// String names the repository for logs and errors.
func (c *Client) String() string {
	return c.ref.Scheme + "://" + c.ref.Registry + "/" + c.ref.Repository
}

// CloseIdleConnections closes idle keep-alive connections.
func (c *Client) CloseIdleConnections() { c.http.CloseIdleConnections() }

func isLoopback(hostport string) bool {
	h := hostport
	if hh, _, err := net.SplitHostPort(hostport); err == nil {
		h = hh
	}
	if h == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(h)
	return err == nil && a.IsLoopback()
}

func credentialFunc(ref Reference, opts Options) (auth.CredentialFunc, error) {
	host := ref.apiHost()
	if opts.Username != "" || opts.Password != "" || opts.Token != "" {
		cred := auth.Credential{Username: opts.Username, Password: opts.Password, AccessToken: opts.Token}
		return auth.StaticCredential(host, cred), nil
	}
	if len(opts.DockerConfig) > 0 {
		st, err := credentials.NewMemoryStoreFromDockerConfig(opts.DockerConfig)
		if err != nil {
			return nil, fmt.Errorf("docker config: %w", err)
		}
		f := credentials.Credential(st)
		return func(ctx context.Context, hostport string) (auth.Credential, error) {
			if hostport != host {
				return auth.EmptyCredential, nil
			}
			cred, err := f(ctx, ref.Registry)
			if err == nil && cred == auth.EmptyCredential && host != ref.Registry {
				cred, err = f(ctx, host)
			}
			return cred, err
		}, nil
	}
	return nil, nil
}

func newTransport(ca []byte) (*fetch.Transport, error) {
	t, err := fetch.NewTransport(ca, 64, 30*time.Second)
	if err != nil {
		return nil, fmt.Errorf("CA bundle: %w", err)
	}
	return t, nil
}

// fetchManifest GETs the manifest or index reference names (a tag or a
// digest) from the registry itself, reads it whole (at most the metadata
// limit) and checks it against its digest when asked by digest.
func (c *Client) fetchManifest(ctx context.Context, reference string) (ocispec.Descriptor, []byte, error) {
	what := c.String() + ":" + reference
	if strings.HasPrefix(reference, "sha256:") {
		what = c.String() + "@" + reference
	}
	desc, rc, err := c.upstream.FetchReference(ctx, reference)
	if err != nil {
		return ocispec.Descriptor{}, nil, classify("fetching manifest", what, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, maxMetadataBytes+1))
	if err != nil {
		return ocispec.Descriptor{}, nil, classify("reading manifest", what, err)
	}
	if len(b) > maxMetadataBytes {
		return ocispec.Descriptor{}, nil, &fetch.SourceError{Op: "fetching manifest", URL: what,
			Err: fmt.Errorf("more than %d bytes: %w", maxMetadataBytes, fetch.ErrSizeMismatch)}
	}
	got := digest.FromBytes(b)
	if d, err := digest.Parse(reference); err == nil && d != got {
		return ocispec.Descriptor{}, nil, &fetch.SourceError{Op: "fetching manifest", URL: what,
			Err: fmt.Errorf("content has digest %s: %w", got, fetch.ErrDigestMismatch)}
	}
	desc.Digest, desc.Size = got, int64(len(b))
	return desc, b, nil
}

// fetchChild GETs a manifest named by digest from a parent (a shard of an
// artifact, a platform's manifest of an index).
func (c *Client) fetchChild(ctx context.Context, d ocispec.Descriptor) ([]byte, error) {
	if d.Size > maxMetadataBytes {
		return nil, &fetch.SourceError{Op: "fetching manifest", URL: c.String() + "@" + d.Digest.String(),
			Err: fmt.Errorf("%d bytes, more than %d: %w", d.Size, maxMetadataBytes, fetch.ErrSizeMismatch)}
	}
	_, b, err := c.fetchManifest(ctx, d.Digest.String())
	if err != nil {
		return nil, err
	}
	if int64(len(b)) != d.Size {
		return nil, &fetch.SourceError{Op: "fetching manifest", URL: c.String() + "@" + d.Digest.String(),
			Err: fmt.Errorf("%d bytes, the descriptor says %d: %w", len(b), d.Size, fetch.ErrSizeMismatch)}
	}
	return b, nil
}

// blobURL is where a repository serves a blob (distribution spec).
func blobURL(r *remote.Repository, d digest.Digest) string {
	scheme := "https"
	if r.PlainHTTP {
		scheme = "http"
	}
	return fmt.Sprintf("%s://%s/v2/%s/blobs/%s", scheme, r.Reference.Registry, r.Reference.Repository, d)
}

// openBlob GETs a blob (bytes off to off+n-1 with a single-range request
// when n >= 0, the whole blob otherwise), from the mirrors in order, then
// the registry. A mirror that fails for any reason is passed over, and a
// blob a mirror served wrong bytes for (distrust) is read from the
// registry only. It returns the body, which holds exactly the asked bytes:
// when a server ignores Range (200), openBlob skips to off itself and
// reports it (ignored), so that the caller can stop asking for ranges.
// mirrorOf tells where the body comes from.
//
// oras-go's blob Fetch reads a blob from its start and seeks with
// open-ended ranges (bytes=N-); a bounded range needs its own request,
// made here through oras-go's auth client (tokens, challenges, redirects).
func (c *Client) openBlob(ctx context.Context, desc ocispec.Descriptor, off, n int64) (io.ReadCloser, bool, error) {
	if !c.isDistrusted(desc.Digest) {
		for _, m := range c.mirrors {
			rc, ignored, err := c.openBlobAt(ctx, m, desc, off, n)
			if err == nil {
				return rc, ignored, nil
			}
			if ctx.Err() != nil {
				return nil, false, err
			}
			klog.FromContext(ctx).V(2).Info("Mirror failed; trying the next one, then the registry", "mirror", m.Reference.Registry, "blob", desc.Digest.String(), "err", err)
		}
	}
	return c.openBlobAt(ctx, c.upstream, desc, off, n)
}

// openStream is openBlob for the long bodies a pull reads several of at
// once (pack runs, layers): over https, each goes over a connection of its
// own with HTTP/1.1 (fetch.WithOwnConnection), also where the registry
// speaks HTTP/2, which manifests and small blobs keep (bench/README.md,
// "HTTP/1.1 for the long bodies of OCI pulls").
func (c *Client) openStream(ctx context.Context, desc ocispec.Descriptor, off, n int64) (io.ReadCloser, bool, error) {
	return c.openBlob(fetch.WithOwnConnection(ctx), desc, off, n)
}

// openUpstreamBlob is openBlob from the registry itself, with the
// client's credentials: what proofs of possession read (a mirror serves
// anyone, so what it holds proves nothing about the credentials).
func (c *Client) openUpstreamBlob(ctx context.Context, desc ocispec.Descriptor, off, n int64) (io.ReadCloser, bool, error) {
	return c.openBlobAt(ctx, c.upstream, desc, off, n)
}

// mirrorOf returns the mirror host a body of openBlob comes from, "" for
// the registry.
func mirrorOf(rc io.ReadCloser) string {
	if b, ok := rc.(*blobBody); ok {
		return b.mirror
	}
	return ""
}

func (c *Client) isDistrusted(d digest.Digest) bool {
	if len(c.mirrors) == 0 {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.distrusted[d]
}

// mirrorFault is called with a failure of the content of a blob body
// (a digest, a size, a layer that does not parse). When the body came
// from a mirror, the mirror is to blame: the blob is read from the
// registry from now on, and the failure becomes transient, so that the
// next attempt does that. Content from the registry fails as it is.
func (c *Client) mirrorFault(ctx context.Context, rc io.ReadCloser, d digest.Digest, err error) error {
	m := mirrorOf(rc)
	if m == "" || err == nil || fetch.IsTransient(err) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	c.distrust(ctx, d, m, err)
	return fetch.Transient(fmt.Errorf("mirror %s: %w (the next attempt reads the blob from the registry)", m, err))
}

// distrust makes the client read blob d from the registry only.
func (c *Client) distrust(ctx context.Context, d digest.Digest, mirror string, why error) {
	c.mu.Lock()
	if len(c.distrusted) >= maxDistrusted {
		clear(c.distrusted)
	}
	c.distrusted[d] = true
	c.mu.Unlock()
	klog.FromContext(ctx).Info("A mirror served a blob that fails its check; reading it from the registry", "mirror", mirror, "blob", d.String(), "err", why)
}

func (c *Client) openBlobAt(ctx context.Context, r *remote.Repository, desc ocispec.Descriptor, off, n int64) (io.ReadCloser, bool, error) {
	u := blobURL(r, desc.Digest)
	what := c.String() + "@" + desc.Digest.String()
	mirror := ""
	if r != c.upstream {
		// As containerd tells a mirror which registry it stands for.
		u += "?ns=" + url.QueryEscape(c.ref.Registry)
		what, mirror = u, r.Reference.Registry
	}
	if off < 0 || (n >= 0 && off+n > desc.Size) || (n < 0 && off != 0) {
		return nil, false, fmt.Errorf("range %d+%d of a blob of %d bytes", off, n, desc.Size)
	}
	ctx = auth.AppendRepositoryScope(ctx, r.Reference, auth.ActionPull)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, false, &fetch.SourceError{Op: "fetching blob", URL: what, Err: err}
	}
	ranged := n >= 0 && !(off == 0 && n == desc.Size)
	if ranged {
		if n == 0 {
			return io.NopCloser(strings.NewReader("")), false, nil
		}
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	}
	resp, err := r.Client.Do(req)
	if err != nil {
		return nil, false, classify("fetching blob", what, err)
	}
	fail := func(err error) (io.ReadCloser, bool, error) {
		_, _ = io.CopyN(io.Discard, resp.Body, 4096)
		resp.Body.Close()
		return nil, false, &fetch.SourceError{Op: "fetching blob", URL: what, Status: resp.StatusCode, Err: err}
	}
	switch {
	case resp.StatusCode == http.StatusPartialContent && ranged:
		first, last, total, err := fetch.ParseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return fail(err)
		}
		if first != off || last != off+n-1 || (total >= 0 && total != desc.Size) {
			return fail(fmt.Errorf("asked for bytes %d-%d/%d, got Content-Range %q", off, off+n-1, desc.Size, resp.Header.Get("Content-Range")))
		}
		return &blobBody{resp.Body, resp.Body, what, mirror}, false, nil
	case resp.StatusCode == http.StatusOK:
		if resp.ContentLength >= 0 && resp.ContentLength != desc.Size {
			return fail(fmt.Errorf("%d bytes announced, the descriptor says %d: %w", resp.ContentLength, desc.Size, fetch.ErrSizeMismatch))
		}
		if !ranged {
			return &blobBody{resp.Body, resp.Body, what, mirror}, false, nil
		}
		// Range ignored: skip to off, and read only n bytes.
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			resp.Body.Close()
			return nil, false, &fetch.SourceError{Op: "fetching blob", URL: what, Err: fetch.Transient(err)}
		}
		return &blobBody{io.LimitReader(resp.Body, n), resp.Body, what, mirror}, true, nil
	}
	err = errutilResponse(resp)
	resp.Body.Close()
	return nil, false, classify("fetching blob", what, err)
}

func errutilResponse(resp *http.Response) error {
	_, _ = io.CopyN(io.Discard, resp.Body, 4096)
	return &errcode.ErrorResponse{Method: resp.Request.Method, URL: resp.Request.URL, StatusCode: resp.StatusCode}
}

// blobBody is the body of a blob GET: read errors are transient.
type blobBody struct {
	r      io.Reader
	c      io.Closer
	what   string
	mirror string // the mirror host that serves it, "" for the registry
}

func (b *blobBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err != nil && err != io.EOF {
		err = &fetch.SourceError{Op: "reading blob", URL: b.what, Err: fetch.Transient(err)}
	}
	return n, err
}

func (b *blobBody) Close() error { return b.c.Close() }

// readBlob reads a whole small blob (at most limit bytes) and checks its
// digest and size. Wrong bytes from a mirror are read again from the
// registry at once.
func (c *Client) readBlob(ctx context.Context, desc ocispec.Descriptor, limit int64) ([]byte, error) {
	what := c.String() + "@" + desc.Digest.String()
	if desc.Size > limit {
		return nil, &fetch.SourceError{Op: "fetching blob", URL: what,
			Err: fmt.Errorf("%d bytes, more than the limit of %d: %w", desc.Size, limit, fetch.ErrSizeMismatch)}
	}
	rc, _, err := c.openBlob(ctx, desc, 0, -1)
	if err != nil {
		return nil, err
	}
	b, err := readWhole(rc, desc, what)
	rc.Close()
	if m := mirrorOf(rc); err != nil && m != "" && !fetch.IsTransient(err) {
		c.distrust(ctx, desc.Digest, m, err)
		if rc, _, err = c.openUpstreamBlob(ctx, desc, 0, -1); err != nil {
			return nil, err
		}
		b, err = readWhole(rc, desc, what)
		rc.Close()
	}
	return b, err
}

func readWhole(rc io.Reader, desc ocispec.Descriptor, what string) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(rc, desc.Size+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) != desc.Size {
		return nil, &fetch.SourceError{Op: "fetching blob", URL: what,
			Err: fmt.Errorf("%d bytes, the descriptor says %d: %w", len(b), desc.Size, fetch.ErrSizeMismatch)}
	}
	if got := digest.FromBytes(b); got != desc.Digest {
		return nil, &fetch.SourceError{Op: "fetching blob", URL: what,
			Err: fmt.Errorf("content has digest %s: %w", got, fetch.ErrDigestMismatch)}
	}
	return b, nil
}

// verifyingReader checks, at EOF, that the bytes had the descriptor's size
// and sha256 digest.
type verifyingReader struct {
	r     io.ReadCloser
	desc  ocispec.Descriptor
	what  string
	h     digestHash
	n     int64
	fault func(error) error // a mirror's fault (Client.mirrorFault), or nil
}

type digestHash interface {
	io.Writer
	Sum([]byte) []byte
}

func newVerifyingReader(r io.ReadCloser, desc ocispec.Descriptor, what string) *verifyingReader {
	return &verifyingReader{r: r, desc: desc, what: what, h: sha256.New()}
}

// verifying returns a verifyingReader of a body of openBlob: wrong bytes
// from a mirror are its fault (mirrorFault).
func (c *Client) verifying(ctx context.Context, body io.ReadCloser, desc ocispec.Descriptor, what string) *verifyingReader {
	v := newVerifyingReader(body, desc, what)
	if mirrorOf(body) != "" {
		v.fault = func(err error) error { return c.mirrorFault(ctx, body, desc.Digest, err) }
	}
	return v
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	n, err := v.read(p)
	if err != nil && err != io.EOF && v.fault != nil {
		err = v.fault(err)
	}
	return n, err
}

func (v *verifyingReader) read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.h.Write(p[:n])
	v.n += int64(n)
	if v.n > v.desc.Size {
		return n, &fetch.SourceError{Op: "reading blob", URL: v.what, Err: fmt.Errorf("more than the %d bytes of the descriptor: %w", v.desc.Size, fetch.ErrSizeMismatch)}
	}
	if err == io.EOF {
		if v.n != v.desc.Size {
			return n, &fetch.SourceError{Op: "reading blob", URL: v.what, Err: fetch.Transient(fmt.Errorf("short read: %d of %d bytes", v.n, v.desc.Size))}
		}
		if got := digest.NewDigestFromBytes(digest.SHA256, v.h.Sum(nil)); got != v.desc.Digest {
			return n, &fetch.SourceError{Op: "reading blob", URL: v.what, Err: fmt.Errorf("content has digest %s: %w", got, fetch.ErrDigestMismatch)}
		}
	}
	return n, err
}

func (v *verifyingReader) Close() error { return v.r.Close() }

// classify wraps an oras-go or transport error in a fetch.SourceError that
// says whether retrying may help.
func classify(op, what string, err error) error {
	if err == nil {
		return nil
	}
	var se *fetch.SourceError
	if errors.As(err, &se) {
		return err
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return &fetch.SourceError{Op: op, URL: what, Err: err}
	}
	var er *errcode.ErrorResponse
	if errors.As(err, &er) {
		e := &fetch.SourceError{Op: op, URL: what, Status: er.StatusCode}
		switch c := er.StatusCode; {
		case c == http.StatusNotFound || c == http.StatusGone:
			e.Err = fmt.Errorf("%w: %v", fetch.ErrNotFound, er.Errors)
		case c == http.StatusUnauthorized || c == http.StatusForbidden:
			e.Err = fmt.Errorf("%w (the registry refused the credentials, or their absence)", fetch.ErrUnauthorized)
		case c >= 500, c == http.StatusTooManyRequests, c == http.StatusRequestTimeout:
			e.Err = fetch.Transient(errors.New(http.StatusText(c)))
		default:
			e.Err = errors.New(http.StatusText(c))
		}
		return e
	}
	if errors.Is(err, auth.ErrBasicCredentialNotFound) || strings.Contains(err.Error(), "missing username or password") {
		return &fetch.SourceError{Op: op, URL: what, Status: http.StatusUnauthorized,
			Err: fmt.Errorf("%w (the registry asks for credentials and none were given)", fetch.ErrUnauthorized)}
	}
	if errors.Is(err, errdef.ErrNotFound) {
		return &fetch.SourceError{Op: op, URL: what, Err: fetch.ErrNotFound}
	}
	var certErr *tls.CertificateVerificationError
	var unknownCA x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	if errors.As(err, &certErr) || errors.As(err, &unknownCA) || errors.As(err, &hostErr) {
		return &fetch.SourceError{Op: op, URL: what, Err: err}
	}
	var ne net.Error
	var oe *net.OpError
	if errors.As(err, &ne) || errors.As(err, &oe) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return &fetch.SourceError{Op: op, URL: what, Err: fetch.Transient(err)}
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		return &fetch.SourceError{Op: op, URL: what, Err: fetch.Transient(ue.Err)}
	}
	return &fetch.SourceError{Op: op, URL: what, Err: err}
}
