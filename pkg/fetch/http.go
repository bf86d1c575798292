package fetch

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// HTTPOptions configure an HTTP repository source.
type HTTPOptions struct {
	// CAFile is a PEM bundle of extra trusted CAs, added to the system roots.
	CAFile string
	// Username and Password enable basic auth.
	Username, Password string
	// BearerToken enables bearer auth (it wins over basic auth).
	// Credentials go only to the repository's own origin (scheme, host and
	// port), never to where a redirect leads elsewhere; control characters
	// in them are refused (ErrInvalidCredentials).
	BearerToken string
	// MaxConnsPerHost bounds the connections to the server; 0 = 64. Idle
	// connections kept for reuse are as many.
	MaxConnsPerHost int
	// ResponseHeaderTimeout bounds the wait for a response; 0 = 30s.
	ResponseHeaderTimeout time.Duration
	// UserAgent is sent with every request; "" = "csi-composefs".
	UserAgent string
	// Transport replaces the transport built from the options above (tests).
	Transport http.RoundTripper
	// AllowRedirect, when set, must accept every URL a redirect leads to
	// (the driver re-applies its allow-list). Redirects from https to http,
	// loops and chains longer than 10 are always refused, for good
	// (ErrRedirectRefused, ErrRedirectLoop: no retry).
	AllowRedirect func(*url.URL) bool
}

// HTTPSource reads an HTTP repository: BASE/images/NAME and
// BASE/objects/xx/yyyy…, as any static web server, CDN or bucket serves it.
// A plain http:// URL is used when given explicitly (integrity comes from
// the digests); https uses the system roots plus the optional CA bundle,
// and HTTP/2. HTTPS_PROXY, HTTP_PROXY and NO_PROXY are honoured.
type HTTPSource struct {
	base    *url.URL
	client  *http.Client
	opts    HTTPOptions
	streams interface{ MaxConcurrentStreams() int } // the transport's, when it tells
	http1   atomic.Bool                             // the last response came over HTTP/1.x
	// packNoRange: the server ignored Range on a pack: read whole packs.
	packNoRange atomic.Bool
	// own counts the requests on connections of their own in flight
	// (ownRequest), at most opts.MaxConnsPerHost.
	own atomic.Int64
}

// ownObjectSize: objects of at least this size are each read over a
// connection of their own (WithOwnConnection) while there is one to
// spare: a few of them fill a fast link, and on the shared HTTP/2
// connection their bytes would all pass through its one reader. Smaller
// ones share the HTTP/2 connection, where a request costs no handshake.
// (The size up to which image build packs objects by default.)
const ownObjectSize = 1 << 20

// getURLOwn is getURL over a connection of its own (WithOwnConnection)
// when fewer than opts.MaxConnsPerHost such requests of the source are in
// flight, until the body is closed; otherwise the request shares the
// connection of the others rather than wait for one.
func (s *HTTPSource) getURLOwn(ctx context.Context, op string, u *url.URL, header ...string) (*http.Response, error) {
	ctx, own := s.ownRequest(ctx)
	resp, err := s.getURL(ctx, op, u, header...)
	if !own {
		return resp, err
	}
	if err != nil {
		s.ownDone()
		return nil, err
	}
	resp.Body = &ownBody{ReadCloser: resp.Body, done: s.ownDone}
	return resp, nil
}

// ownRequest returns ctx marked for a connection of its own
// (WithOwnConnection) and true when fewer than opts.MaxConnsPerHost such
// requests of the source are in flight (the caller calls ownDone when its
// body is closed or the request failed), else ctx and false.
func (s *HTTPSource) ownRequest(ctx context.Context) (context.Context, bool) {
	if s.base.Scheme != "https" {
		return ctx, false
	}
	if s.own.Add(1) > int64(s.opts.MaxConnsPerHost) {
		s.own.Add(-1)
		return ctx, false
	}
	return WithOwnConnection(ctx), true
}

func (s *HTTPSource) ownDone() { s.own.Add(-1) }

// ownBody calls done once when the body is closed.
type ownBody struct {
	io.ReadCloser
	once sync.Once
	done func()
}

func (b *ownBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.done)
	return err
}

var _ Source = (*HTTPSource)(nil)

// NewHTTPSource returns a source for the repository at baseURL.
func NewHTTPSource(baseURL string, opts HTTPOptions) (*HTTPSource, error) {
	u, err := url.Parse(strings.TrimSuffix(baseURL, "/"))
	if err != nil { // url's error quotes the URL whole
		return nil, fmt.Errorf("repository URL %s: not a valid URL", RedactURL(baseURL))
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("repository URL %q: scheme must be http or https", redactedURL(u))
	}
	if u.Host == "" {
		return nil, fmt.Errorf("repository URL %q: no host", redactedURL(u))
	}
	if u.User != nil { // credentials in the URL become basic auth
		if opts.Username == "" && opts.BearerToken == "" {
			opts.Username = u.User.Username()
			opts.Password, _ = u.User.Password()
		}
		u.User = nil
	}
	u.RawQuery, u.Fragment = "", ""
	if err := checkCredentials(opts); err != nil {
		return nil, err
	}
	if opts.MaxConnsPerHost <= 0 {
		opts.MaxConnsPerHost = 64
	}
	if opts.ResponseHeaderTimeout <= 0 {
		opts.ResponseHeaderTimeout = 30 * time.Second
	}
	if opts.UserAgent == "" {
		opts.UserAgent = "csi-composefs"
	}
	rt := opts.Transport
	if rt == nil {
		t, err := newTransport(opts)
		if err != nil {
			return nil, err
		}
		rt = t
	}
	streams, _ := rt.(interface{ MaxConcurrentStreams() int })
	if auth := authorization(opts); auth != "" {
		rt = &originAuth{rt: rt, origin: origin(u), auth: auth}
	}
	client := &http.Client{Transport: rt, CheckRedirect: func(req *http.Request, via []*http.Request) error {
		return checkRedirect(req, via, opts.AllowRedirect)
	}}
	return &HTTPSource{base: u, client: client, opts: opts, streams: streams}, nil
}

// MaxInFlight is how many requests the repository serves at once, 0 when
// unknown (no response yet, an HTTP/2 transport of the caller's): over
// HTTP/2 its server's stream limit on one connection, over HTTP/1.1 the
// connections the source opens (MaxConnsPerHost; more requests would only
// wait for one). The store keeps a pull's downloads in flight within it,
// so that over HTTP/2 one connection, and one connection's buffers, serve
// the pull.
func (s *HTTPSource) MaxInFlight() int {
	if s.http1.Load() {
		return s.opts.MaxConnsPerHost
	}
	if s.streams == nil {
		return 0
	}
	return s.streams.MaxConcurrentStreams()
}

// maxRedirects bounds a redirect chain.
const maxRedirects = 10

// checkRedirect refuses, for good (no retry), a redirect chain longer than
// maxRedirects or back to a URL it went through, one from https to http,
// and one the allow-list refuses.
func checkRedirect(req *http.Request, via []*http.Request, allow func(*url.URL) bool) error {
	to := req.URL.String()
	for _, v := range via {
		if v.URL.String() == to {
			return fmt.Errorf("redirect loop back to %s: %w", redactedURL(req.URL), ErrRedirectLoop)
		}
	}
	if len(via) >= maxRedirects {
		return fmt.Errorf("stopped after %d redirects: %w", maxRedirects, ErrRedirectLoop)
	}
	for _, v := range via {
		if v.URL.Scheme == "https" && req.URL.Scheme != "https" {
			return fmt.Errorf("redirect from https to %s would drop TLS: %w", redactedURL(req.URL), ErrRedirectRefused)
		}
	}
	if allow != nil && !allow(req.URL) {
		return fmt.Errorf("redirect to %s is not an allowed source: %w", redactedURL(req.URL), ErrRedirectRefused)
	}
	return nil
}

// checkCredentials refuses credentials that cannot go in an HTTP header
// (a newline would end it): that is bad input, not a transient failure.
func checkCredentials(opts HTTPOptions) error {
	for _, c := range []struct{ what, v string }{
		{"username", opts.Username}, {"password", opts.Password}, {"bearer token", opts.BearerToken},
	} {
		if i := strings.IndexFunc(c.v, isControl); i >= 0 {
			return fmt.Errorf("%s: control character at byte %d (a stray newline?): %w", c.what, i, ErrInvalidCredentials)
		}
	}
	if strings.Contains(opts.Username, ":") {
		return fmt.Errorf("username: must not contain ':' (basic auth): %w", ErrInvalidCredentials)
	}
	return nil
}

func isControl(r rune) bool { return r < ' ' || r == 0x7f }

// authorization is the Authorization header the options ask for, or "".
func authorization(opts HTTPOptions) string {
	switch {
	case opts.BearerToken != "":
		return "Bearer " + opts.BearerToken
	case opts.Username != "" || opts.Password != "":
		return "Basic " + base64.StdEncoding.EncodeToString([]byte(opts.Username+":"+opts.Password))
	}
	return ""
}

// origin is scheme://host:port of u, lower-case, with the default port
// spelled out.
func origin(u *url.URL) string {
	scheme := strings.ToLower(u.Scheme)
	port := u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[scheme]
	}
	return scheme + "://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port)
}

// originAuth adds the credentials to requests for the repository's own
// origin (scheme, host and port) only. net/http would forward a header set
// on the first request to every port of the same host, and to subdomains.
type originAuth struct {
	rt     http.RoundTripper
	origin string
	auth   string
}

func (t *originAuth) RoundTrip(req *http.Request) (*http.Response, error) {
	if origin(req.URL) != t.origin || req.Header.Get("Authorization") != "" {
		return t.rt.RoundTrip(req)
	}
	r := req.Clone(req.Context())
	r.Header.Set("Authorization", t.auth)
	return t.rt.RoundTrip(r)
}

// CloseIdleConnections lets http.Client.CloseIdleConnections reach the
// transport.
func (t *originAuth) CloseIdleConnections() {
	if c, ok := t.rt.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

func newTransport(opts HTTPOptions) (*Transport, error) {
	var pem []byte
	if opts.CAFile != "" {
		var err error
		if pem, err = os.ReadFile(opts.CAFile); err != nil {
			return nil, fmt.Errorf("reading CA bundle: %w", err)
		}
	}
	t, err := NewTransport(pem, opts.MaxConnsPerHost, opts.ResponseHeaderTimeout)
	if err != nil {
		return nil, fmt.Errorf("CA bundle %s: %w", opts.CAFile, err)
	}
	return t, nil
}

// ErrNoCertificate: a CA bundle without a PEM certificate.
var ErrNoCertificate = errors.New("no PEM certificate found")

// NewTransport is the HTTP transport of every source (HTTP repositories
// and registries): the system's roots plus the PEM certificates of caPEM
// (none: the system's alone), HTTP/2 with bounded buffers (HTTP2Config),
// at most maxConnsPerHost connections to a host, and responseHeaderTimeout
// for a response's headers. It tells how many requests the HTTP/2 server
// takes at once on one connection (MaxConcurrentStreams).
func NewTransport(caPEM []byte, maxConnsPerHost int, responseHeaderTimeout time.Duration) (*Transport, error) {
	roots, err := x509.SystemCertPool()
	if err != nil || roots == nil {
		roots = x509.NewCertPool()
	}
	if len(caPEM) > 0 && !roots.AppendCertsFromPEM(caPEM) {
		return nil, ErrNoCertificate
	}
	base := func() *http.Transport {
		return &http.Transport{
			Proxy: http.ProxyFromEnvironment,
			DialContext: (&net.Dialer{
				Timeout:   30 * time.Second,
				KeepAlive: 30 * time.Second,
			}).DialContext,
			TLSClientConfig:       &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
			MaxIdleConns:          maxConnsPerHost * 2,
			MaxIdleConnsPerHost:   maxConnsPerHost,
			MaxConnsPerHost:       maxConnsPerHost,
			IdleConnTimeout:       90 * time.Second,
			TLSHandshakeTimeout:   15 * time.Second,
			ResponseHeaderTimeout: responseHeaderTimeout,
			ExpectContinueTimeout: time.Second,
			// Objects are mostly compressible text and binaries that a server
			// may gzip on the fly; the transport decompresses transparently.
		}
	}
	t1 := base()
	t1.ForceAttemptHTTP2 = true
	t1.HTTP2 = HTTP2Config()
	// The long reads (pack runs) go each over a connection of their own,
	// HTTP/1.1 over TLS alone: see WithOwnConnection.
	own := base()
	own.Protocols = new(http.Protocols)
	own.Protocols.SetHTTP1(true)
	own.TLSClientConfig.NextProtos = []string{"http/1.1"}
	t := &Transport{Transport: t1, own: own}
	// x/net's HTTP/2 (the code net/http bundles) in place of the bundled
	// copy, for its connection pool: the pool tells what each server's
	// SETTINGS_MAX_CONCURRENT_STREAMS is, which net/http keeps to itself.
	t2, err := http2.ConfigureTransports(t1)
	if err != nil {
		return nil, fmt.Errorf("configuring HTTP/2: %w", err)
	}
	t.pool = &streamsPool{ClientConnPool: t2.ConnPool, t: t}
	t2.ConnPool = t.pool
	return t, nil
}

// Transport is the transport NewTransport makes.
type Transport struct {
	*http.Transport
	pool    *streamsPool
	streams atomic.Int64 // the last HTTP/2 connection's advertised stream limit; 0: none seen
	// own carries the requests of WithOwnConnection over https: HTTP/1.1,
	// a connection each.
	own *http.Transport
	// ownRefused: host:port → when a request over own failed and the
	// same request over the shared transport did not; such a host gets
	// no own connections for ownRetryAfter.
	ownRefused sync.Map
}

// ownRetryAfter is how long a host whose HTTP/1.1 over TLS failed gets
// none: a server that does not speak it is not asked again per request,
// and one that failed once by chance is asked again later.
const ownRetryAfter = 10 * time.Minute

type ownConnectionKey struct{}

// WithOwnConnection marks ctx's requests as long reads of many bytes (an
// HTTP repository's pack runs, up to 16 MiB each, and its objects of 1
// MiB or more; any source of Transport may use it):
// over https, Transport sends each over a connection of its own, with
// HTTP/1.1 (ALPN "http/1.1"), rather than as a stream of the shared
// HTTP/2 connection. On one HTTP/2 connection every byte of every run is
// decrypted and framed by that connection's one reading goroutine and
// copied once more into the stream's buffer, and each read of a body
// sends a flow-control update through the connection's one writer; over
// connections of their own, each run is decrypted by the goroutine that
// reads it, with TCP's flow control (bench/README.md, "HTTP/2 on fast
// links"). A server that does not speak HTTP/1.1 over TLS gets the
// request over the shared transport instead. Plain http is HTTP/1.1
// already.
func WithOwnConnection(ctx context.Context) context.Context {
	return context.WithValue(ctx, ownConnectionKey{}, true)
}

func ownConnection(ctx context.Context) bool {
	v, _ := ctx.Value(ownConnectionKey{}).(bool)
	return v
}

// RoundTrip sends req over the shared transport (HTTP/2 where the server
// speaks it), or, for a request of WithOwnConnection over https, over a
// connection of its own (HTTP/1.1); when that fails (an error before a
// response, 505 or 426) and the shared transport answers, the host gets
// no own connections for a while.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if t.own == nil || req.URL.Scheme != "https" || !ownConnection(req.Context()) {
		return t.Transport.RoundTrip(req)
	}
	host := canonicalHost(req.URL)
	if at, ok := t.ownRefused.Load(host); ok && time.Since(at.(time.Time)) < ownRetryAfter {
		return t.Transport.RoundTrip(req)
	}
	resp, err := t.own.RoundTrip(req)
	if err == nil && resp.StatusCode != http.StatusHTTPVersionNotSupported && resp.StatusCode != http.StatusUpgradeRequired {
		return resp, nil
	}
	if req.Context().Err() != nil {
		return resp, err
	}
	var why string
	if err != nil {
		why = err.Error()
	} else {
		why = resp.Status
		_, _ = io.CopyN(io.Discard, resp.Body, 4096)
		resp.Body.Close()
	}
	resp, err = t.Transport.RoundTrip(req)
	if err == nil {
		t.ownRefused.Store(host, time.Now())
		klog.FromContext(req.Context()).V(2).Info("HTTP/1.1 over TLS failed where the shared connection answers; long reads share it for a while",
			"host", host, "err", redactURLsIn(why), "for", ownRetryAfter)
	}
	return resp, err
}

// canonicalHost is host:port of u, the default port spelled out.
func canonicalHost(u *url.URL) string {
	o := origin(u)
	return o[strings.Index(o, "://")+3:]
}

// CloseIdleConnections closes the idle connections of both protocols.
// (net/http's own method reaches only its bundled HTTP/2, and x/net's
// needs its own pool, which streamsPool stands in front of.)
func (t *Transport) CloseIdleConnections() {
	t.Transport.CloseIdleConnections()
	t.pool.closeIdle()
	if t.own != nil {
		t.own.CloseIdleConnections()
	}
}

// MaxConcurrentStreams is how many requests the HTTP/2 server the
// transport spoke to last takes at once on one connection (its
// SETTINGS_MAX_CONCURRENT_STREAMS), 0 before any HTTP/2 connection. Past
// it, the transport opens another connection, which buffers as much
// again (HTTP2Config).
func (t *Transport) MaxConcurrentStreams() int { return int(t.streams.Load()) }

// streamsPool notes the stream limit of every HTTP/2 connection a request
// goes to, and keeps the connections for closeIdle.
type streamsPool struct {
	http2.ClientConnPool
	t *Transport

	mu    sync.Mutex
	conns map[*http2.ClientConn]struct{}
}

func (p *streamsPool) GetClientConn(req *http.Request, addr string) (*http2.ClientConn, error) {
	cc, err := p.ClientConnPool.GetClientConn(req, addr)
	if err == nil {
		if n := cc.State().MaxConcurrentStreams; n > 0 {
			p.t.streams.Store(int64(n))
		}
		p.mu.Lock()
		if _, ok := p.conns[cc]; !ok {
			if p.conns == nil {
				p.conns = make(map[*http2.ClientConn]struct{})
			}
			for c := range p.conns { // forget the closed ones
				if c.State().Closed {
					delete(p.conns, c)
				}
			}
			p.conns[cc] = struct{}{}
		}
		p.mu.Unlock()
	}
	return cc, err
}

// closeIdle shuts down the connections without a request: gracefully
// (GOAWAY), so that one a request took meanwhile finishes it, and the
// pool hands it to no further one.
func (p *streamsPool) closeIdle() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		st := c.State()
		if st.Closed {
			delete(p.conns, c)
			continue
		}
		if st.StreamsActive == 0 && st.StreamsReserved == 0 && st.StreamsPending == 0 {
			delete(p.conns, c)
			go c.Shutdown(context.Background())
		}
	}
}

// HTTP2Config bounds what an HTTP/2 connection of a source buffers:
// many downloads share one connection as streams, and each may buffer up
// to its window (4 MiB) when the store reads slower than the link
// delivers; the connection's window, 8 MiB, bounds all of them. A pull
// keeps within the server's stream limit (HTTPSource.MaxInFlight), so one
// connection, and 8 MiB of buffers, serve it. 8 MiB is 3 times the
// bandwidth-delay product of 1 Gbit/s at 20 ms and 4 times that of 200
// Mbit/s at 80 ms: the window never holds a link-bound pull back there;
// only a CPU-bound one fills it. Every transport of the project's sources
// uses it, so that none depends on Go's defaults. (A 16 MiB window let a
// CPU-bound pull hold 16 MiB of bodies per connection, and the garbage
// collector's headroom as much again: bench/README.md, RSS.)
func HTTP2Config() *http.HTTP2Config {
	return &http.HTTP2Config{
		MaxReceiveBufferPerStream:     4 << 20,
		MaxReceiveBufferPerConnection: 8 << 20,
	}
}

// String returns the base URL (without credentials).
func (s *HTTPSource) String() string { return redactedURL(s.base) }

// CloseIdleConnections closes idle keep-alive connections.
func (s *HTTPSource) CloseIdleConnections() { s.client.CloseIdleConnections() }

func (s *HTTPSource) url(elem ...string) string {
	u := *s.base
	u.Path = strings.TrimSuffix(u.Path, "/") + "/" + strings.Join(elem, "/")
	u.RawPath = ""
	return u.String()
}

// ValidImageName reports whether name can name an image in a repository:
// one path element of printable ASCII, not "." or "..".
func ValidImageName(name string) error {
	if name == "" || name == "." || name == ".." || len(name) > 255 {
		return fmt.Errorf("image name %q: must be 1 to 255 characters and not . or ..", name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c <= ' ' || c >= 0x7f || c == '/' || c == '\\' || c == '%' || c == '?' || c == '#' {
			return fmt.Errorf("image name %q: character %q not allowed", name, c)
		}
	}
	return nil
}

// OpenImage GETs BASE/images/NAME.
func (s *HTTPSource) OpenImage(ctx context.Context, ref ImageRef) (io.ReadCloser, int64, error) {
	name := ref.name()
	if err := ValidImageName(name); err != nil {
		return nil, 0, err
	}
	resp, err := s.get(ctx, "fetching image", s.url("images", name))
	if err != nil {
		return nil, 0, err
	}
	return httpBody{ReadCloser: resp.Body, op: "reading image", url: resp.Request.URL}, resp.ContentLength, nil
}

// ObjectLocation returns the URL of the object d.
func (s *HTTPSource) ObjectLocation(d cfs.Digest) string { return s.objectURL(d).String() }

// objectURL is the URL of the object d, built without formatting and
// parsing a string (a pull makes one request per object).
func (s *HTTPSource) objectURL(d cfs.Digest) *url.URL {
	u := *s.base
	u.Path = strings.TrimSuffix(u.Path, "/") + "/objects/" + d.ObjectPath()
	u.RawPath = ""
	return &u
}

// OpenObject GETs BASE/objects/xx/yyyy…, an object of ownObjectSize or
// more over a connection of its own while there is one to spare.
func (s *HTTPSource) OpenObject(ctx context.Context, d cfs.Digest, size uint64) (io.ReadCloser, error) {
	get := s.getURL
	if size >= ownObjectSize {
		get = s.getURLOwn
	}
	resp, err := get(ctx, "fetching object", s.objectURL(d))
	if err != nil {
		return nil, err
	}
	if resp.ContentLength >= 0 && uint64(resp.ContentLength) != size {
		resp.Body.Close()
		kind := ErrSizeMismatch
		if uint64(resp.ContentLength) < size {
			kind = Transient(ErrSizeMismatch) // a truncating cache may do better next time
		}
		return nil, &SourceError{Op: "fetching object", URL: resp.Request.URL.String(),
			Err: fmt.Errorf("server announces %d bytes, the image records %d: %w", resp.ContentLength, size, kind)}
	}
	return httpBody{ReadCloser: resp.Body, op: "reading object", url: resp.Request.URL}, nil
}

// get GETs rawURL; header holds extra header names and values (a Range
// request also accepts 206).
func (s *HTTPSource) get(ctx context.Context, op, rawURL string, header ...string) (*http.Response, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, &SourceError{Op: op, URL: rawURL, Err: errors.New(redactURLsIn(err.Error()))}
	}
	return s.getURL(ctx, op, u, header...)
}

// getURL is get of a parsed URL (u is the request's: not to be changed).
func (s *HTTPSource) getURL(ctx context.Context, op string, u *url.URL, header ...string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "", nil)
	if err != nil {
		return nil, &SourceError{Op: op, URL: u.String(), Err: errors.New(redactURLsIn(err.Error()))}
	}
	req.URL, req.Host = u, strings.TrimSuffix(u.Host, ":") // as NewRequest does
	rawURL := func() string { return u.String() }
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	req.Header.Set("User-Agent", s.opts.UserAgent)
	resp, err := s.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, &SourceError{Op: op, URL: rawURL(), Err: context.Cause(ctx)}
		}
		// Strip the *url.Error wrapper: it repeats the URL.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		if errors.Is(err, ErrRedirectRefused) || errors.Is(err, ErrRedirectLoop) {
			return nil, &SourceError{Op: op, URL: rawURL(), Err: err} // final: the next try goes the same way
		}
		var certErr *tls.CertificateVerificationError
		var unknownCA x509.UnknownAuthorityError
		var hostErr x509.HostnameError
		if errors.As(err, &certErr) || errors.As(err, &unknownCA) || errors.As(err, &hostErr) {
			return nil, &SourceError{Op: op, URL: rawURL(), Err: err} // retrying will not help
		}
		// The caller's context is alive, so a timeout here is ours (no
		// response headers in time, a dial or TLS handshake that hung): a
		// transient failure of the server, not the caller giving up, which
		// is what net/http's errors.Is(err, context.DeadlineExceeded) would
		// say. Messages of net/http may quote a URL (a bad Location).
		return nil, &SourceError{Op: op, URL: rawURL(), Err: Transient(errors.New(redactURLsIn(err.Error())))}
	}
	if resp.ProtoMajor == 1 != s.http1.Load() && !ownConnection(ctx) { // own connections are HTTP/1.1 whatever the shared one speaks
		s.http1.Store(resp.ProtoMajor == 1)
	}
	if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusPartialContent && req.Header.Get("Range") != "" {
		return resp, nil
	}
	// Drain a little so that the connection can be reused.
	_, _ = io.CopyN(io.Discard, resp.Body, 4096)
	resp.Body.Close()
	se := &SourceError{Op: op, URL: rawURL(), Status: resp.StatusCode}
	if resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable {
		se.RetryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	}
	switch {
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
		se.Err = ErrNotFound
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		se.Err = ErrUnauthorized
	case resp.StatusCode >= 500, resp.StatusCode == http.StatusTooManyRequests,
		resp.StatusCode == http.StatusRequestTimeout:
		se.Err = Transient(errors.New(http.StatusText(resp.StatusCode)))
	default:
		se.Err = errors.New(http.StatusText(resp.StatusCode))
	}
	return nil, se
}

// httpBody names the URL in read errors (resets, truncation); the URL is
// formatted only then.
type httpBody struct {
	io.ReadCloser
	op  string
	url *url.URL
}

func (b httpBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		err = &SourceError{Op: b.op, URL: b.url.String(), Err: err}
	}
	return n, err
}

// parseRetryAfter reads a Retry-After header (RFC 9110 10.2.3): a number
// of seconds or an HTTP date; 0 when absent, unparsable or past.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if secs, err := strconv.ParseUint(v, 10, 32); err == nil {
		return time.Duration(secs) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}
