package fetch

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// countingServer serves repo (when non-empty) and counts requests; handle
// may answer a request itself.
type countingServer struct {
	*httptest.Server
	n atomic.Int32
}

func newCountingServer(t *testing.T, tls bool, repo string, handle func(w http.ResponseWriter, r *http.Request) bool) *countingServer {
	t.Helper()
	cs := &countingServer{}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cs.n.Add(1)
		if handle != nil && handle(w, r) {
			return
		}
		if repo == "" {
			http.NotFound(w, r)
			return
		}
		http.ServeFile(w, r, filepath.Join(repo, filepath.FromSlash(r.URL.Path)))
	})
	if tls {
		cs.Server = httptest.NewTLSServer(h)
	} else {
		cs.Server = httptest.NewServer(h)
	}
	t.Cleanup(cs.Close)
	return cs
}

// TestRedirectRefusalsAreFinal: a redirect outside the allowed sources, an
// https→http downgrade, a loop and a chain too long are refused once, with
// an error that says so and is not retried (each refused target serves the
// image, so a missing refusal shows as a success).
func TestRedirectRefusalsAreFinal(t *testing.T) {
	repo := t.TempDir()
	writeRepoImage(t, repo, "img.cfs", makeFiles("f", 5, 2, 5000))
	plain := newCountingServer(t, false, repo, nil)
	for _, tt := range []struct {
		name    string
		tls     bool
		allow   func(first *countingServer) func(*url.URL) bool
		handle  func(first **countingServer) func(w http.ResponseWriter, r *http.Request) bool
		want    error
		msg     string
		maxReqs int32 // requests the first server may get
	}{
		{
			name: "outside the allow-list",
			allow: func(first *countingServer) func(*url.URL) bool {
				return func(u *url.URL) bool { return strings.HasPrefix(u.String(), first.URL+"/") }
			},
			handle: func(**countingServer) func(w http.ResponseWriter, r *http.Request) bool {
				return func(w http.ResponseWriter, r *http.Request) bool {
					http.Redirect(w, r, plain.URL+r.URL.Path, http.StatusFound)
					return true
				}
			},
			want: ErrRedirectRefused, msg: "not an allowed source", maxReqs: 1,
		},
		{
			name: "https to http", tls: true,
			handle: func(**countingServer) func(w http.ResponseWriter, r *http.Request) bool {
				return func(w http.ResponseWriter, r *http.Request) bool {
					http.Redirect(w, r, plain.URL+r.URL.Path, http.StatusFound)
					return true
				}
			},
			want: ErrRedirectRefused, msg: "from https to", maxReqs: 1,
		},
		{
			name: "https to https to http", tls: true,
			handle: func(first **countingServer) func(w http.ResponseWriter, r *http.Request) bool {
				return func(w http.ResponseWriter, r *http.Request) bool {
					if strings.HasPrefix(r.URL.Path, "/images/") {
						http.Redirect(w, r, (*first).URL+"/hop"+r.URL.Path, http.StatusFound)
					} else {
						http.Redirect(w, r, plain.URL+strings.TrimPrefix(r.URL.Path, "/hop"), http.StatusFound)
					}
					return true
				}
			},
			want: ErrRedirectRefused, msg: "from https to", maxReqs: 2,
		},
		{
			name: "loop",
			handle: func(first **countingServer) func(w http.ResponseWriter, r *http.Request) bool {
				return func(w http.ResponseWriter, r *http.Request) bool {
					if strings.HasPrefix(r.URL.Path, "/images/") {
						http.Redirect(w, r, "/elsewhere"+r.URL.Path, http.StatusFound)
					} else {
						http.Redirect(w, r, strings.TrimPrefix(r.URL.Path, "/elsewhere"), http.StatusFound)
					}
					return true
				}
			},
			want: ErrRedirectLoop, msg: "redirect loop", maxReqs: 2,
		},
		{
			name: "too many",
			handle: func(first **countingServer) func(w http.ResponseWriter, r *http.Request) bool {
				return func(w http.ResponseWriter, r *http.Request) bool {
					http.Redirect(w, r, "/more"+r.URL.Path, http.StatusFound)
					return true
				}
			},
			want: ErrRedirectLoop, msg: "stopped after 10 redirects", maxReqs: 10,
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			plain.n.Store(0)
			var first *countingServer
			first = newCountingServer(t, tt.tls, "", tt.handle(&first))
			opts := HTTPOptions{}
			if tt.tls {
				opts.Transport = first.Client().Transport
			}
			if tt.allow != nil {
				opts.AllowRedirect = tt.allow(first)
			}
			src := newSource(t, first.URL, opts)
			s := openStore(t, t.TempDir(), testOptions())
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_, err := s.EnsureImage(ctx, src, ImageRef{Name: "img.cfs"})
			if !errors.Is(err, tt.want) || IsTransient(err) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("got %v, want a final %v saying %q", err, tt.want, tt.msg)
			}
			if r := s.Counters().Retries; r != 0 {
				t.Errorf("retried %d times", r)
			}
			if n := first.n.Load(); n > tt.maxReqs {
				t.Errorf("%d requests to the repository, want at most %d", n, tt.maxReqs)
			}
			if n := plain.n.Load(); n != 0 {
				t.Errorf("%d requests reached the refused target", n)
			}
		})
	}
}

// TestRedirectURLsAreRedacted: URLs a redirect leads to are named in errors
// without their userinfo and query (a pre-signed link's signature).
func TestRedirectURLsAreRedacted(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 6, 1, 5000)
	writeRepoImage(t, repo, "img.cfs", files)
	const secrets = "s3cr3tpw X-Amz-Signature=deadbeef X-Amz-Credential=AKIAEXAMPLE"
	// The CDN announces a wrong length for every object.
	cdn := newCountingServer(t, false, repo, func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasPrefix(r.URL.Path, "/objects/") {
			w.Header().Set("Content-Length", "3")
			w.Write([]byte("abc"))
			return true
		}
		return false
	})
	cdnURL, _ := url.Parse(cdn.URL)
	presigned := func(p string) string {
		return "http://user:s3cr3tpw@" + cdnURL.Host + p + "?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAEXAMPLE"
	}
	first := newCountingServer(t, false, repo, func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == "/images/refused.cfs" {
			http.Redirect(w, r, "http://user:s3cr3tpw@refused.invalid/x?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAEXAMPLE", http.StatusFound)
			return true
		}
		if strings.HasPrefix(r.URL.Path, "/objects/") {
			http.Redirect(w, r, presigned(r.URL.Path), http.StatusFound)
			return true
		}
		return false
	})
	src := newSource(t, first.URL, HTTPOptions{AllowRedirect: func(u *url.URL) bool { return u.Hostname() != "refused.invalid" }})
	s := openStore(t, t.TempDir(), testOptions())
	ctx := context.Background()
	check := func(what string, err error, want string) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error", what)
		}
		for _, sec := range strings.Fields(secrets) {
			if strings.Contains(err.Error(), sec) || strings.Contains(err.Error(), url.QueryEscape(sec)) {
				t.Errorf("%s: error shows %q: %v", what, sec, err)
			}
		}
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v does not name %s", what, err, want)
		}
	}
	_, err := s.EnsureImage(ctx, src, ImageRef{Name: "refused.cfs"})
	check("refused redirect", err, "http://REDACTED@refused.invalid/x?REDACTED")
	d, err := s.EnsureImage(ctx, src, ImageRef{Name: "img.cfs"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.EnsureObjects(ctx, src, d)
	check("object behind a pre-signed redirect", err, "http://REDACTED@"+cdnURL.Host+"/objects/")
}

// TestCredentialsOnlyToTheirOrigin: the repository's credentials follow a
// redirect within its origin, and never one to another port of the same
// host (a second listener) or another host name.
func TestCredentialsOnlyToTheirOrigin(t *testing.T) {
	repo := t.TempDir()
	writeRepoImage(t, repo, "img.cfs", makeFiles("f", 7, 3, 5000))
	var mu sync.Mutex
	leaked := map[string]string{}
	other := newCountingServer(t, false, repo, func(w http.ResponseWriter, r *http.Request) bool {
		if a := r.Header.Get("Authorization"); a != "" {
			mu.Lock()
			leaked[r.Host+r.URL.Path] = a
			mu.Unlock()
		}
		return false
	})
	otherURL, _ := url.Parse(other.URL)
	_, otherPort, _ := net.SplitHostPort(otherURL.Host)
	for _, tt := range []struct {
		name string
		opts HTTPOptions
		want string
	}{
		{"bearer", HTTPOptions{BearerToken: "tok3n"}, "Bearer tok3n"},
		{"basic", HTTPOptions{Username: "u", Password: "pw"}, "Basic dTpwdw=="},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var sameOrigin, objects atomic.Int32
			first := newCountingServer(t, false, repo, func(w http.ResponseWriter, r *http.Request) bool {
				if r.Header.Get("Authorization") != tt.want {
					http.Error(w, "no", http.StatusUnauthorized)
					return true
				}
				switch {
				case strings.HasPrefix(r.URL.Path, "/images/"): // within the origin
					http.Redirect(w, r, "/moved"+r.URL.Path, http.StatusFound)
				case strings.HasPrefix(r.URL.Path, "/moved/"):
					sameOrigin.Add(1)
					http.ServeFile(w, r, filepath.Join(repo, filepath.FromSlash(strings.TrimPrefix(r.URL.Path, "/moved"))))
				case objects.Add(1)%2 == 1: // another host name, same port
					http.Redirect(w, r, "http://localhost:"+otherPort+r.URL.Path, http.StatusFound)
				default: // another port of this host
					http.Redirect(w, r, other.URL+r.URL.Path, http.StatusFound)
				}
				return true
			})
			src := newSource(t, first.URL, tt.opts)
			s := openStore(t, t.TempDir(), testOptions())
			mustPull(t, s, src, "img.cfs")
			if sameOrigin.Load() == 0 {
				t.Error("the redirect within the origin lost the credentials")
			}
			if other.n.Load() == 0 {
				t.Fatal("no object came through the other listener")
			}
			mu.Lock()
			defer mu.Unlock()
			for where, a := range leaked {
				t.Errorf("credentials %q sent to %s", a, where)
			}
			clear(leaked)
		})
	}
}

// TestNoResponseHeadersIsTransient: a server that accepts the connection and
// never answers is a transient failure (retried, then given up on), not a
// deadline of the caller (net/http's timeout matches
// context.DeadlineExceeded).
func TestNoResponseHeadersIsTransient(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns sync.WaitGroup
	done := make(chan struct{})
	t.Cleanup(func() { close(done); l.Close(); conns.Wait() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() { defer conns.Done(); <-done; c.Close() }()
		}
	}()
	src := newSource(t, "http://"+l.Addr().String(), HTTPOptions{ResponseHeaderTimeout: 50 * time.Millisecond})
	opts := testOptions()
	opts.Retries = 2
	s := openStore(t, t.TempDir(), opts)
	_, err = s.EnsureImage(context.Background(), src, ImageRef{Name: "img.cfs"})
	if !IsTransient(err) || errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "response headers") {
		t.Fatalf("got %v, want a transient failure naming the missing response headers", err)
	}
	if r := s.Counters().Retries; r != 2 {
		t.Errorf("%d retries, want 2", r)
	}
}

func TestBadRepositoryURLIsRedacted(t *testing.T) {
	_, err := NewHTTPSource("https://u:s3cr3t@h/%zz?sig=s3cr3t", HTTPOptions{})
	if err == nil || strings.Contains(err.Error(), "s3cr3t") || !strings.Contains(err.Error(), "https://REDACTED@h/") {
		t.Errorf("got %v, want an error naming the URL redacted", err)
	}
}

func TestCredentialsWithControlCharacters(t *testing.T) {
	for i, opts := range []HTTPOptions{
		{BearerToken: "abc\ndef"}, {BearerToken: "abc\x00"}, {Username: "u", Password: "p\r\nX-Injected: 1"},
		{Username: "a\tb"}, {Username: "a:b", Password: "c"},
	} {
		if _, err := NewHTTPSource("http://example.invalid/", opts); !errors.Is(err, ErrInvalidCredentials) {
			t.Errorf("case %d: %v, want ErrInvalidCredentials", i, err)
		} else if strings.Contains(err.Error(), "abc") || strings.Contains(err.Error(), "X-Injected") {
			t.Errorf("the error shows the value: %v", err)
		}
	}
}

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"https://h/p": "https://h/p",
		"https://u:pw@h:8443/p?X-Amz-Signature=s#f": "https://REDACTED@h:8443/p?REDACTED",
		"https://u@h/p":            "https://REDACTED@h/p",
		"http://h/p?":              "http://h/p?REDACTED",
		"http://u:p w@h/%zz?sig=1": "http://REDACTED@h/%zz?REDACTED",
		"http://u:p@h/\x7fx":       "http://REDACTED@h/x",
		"mailto:someone":           "mailto:REDACTED",
	} {
		if got := RedactURL(in); got != want {
			t.Errorf("RedactURL(%q) = %q, want %q", in, got, want)
		}
	}
	if got := redactURLsIn(`failed to parse Location header "http://u:pw@h/x?sig=1": bad`); got != `failed to parse Location header "http://REDACTED@h/x?REDACTED": bad` {
		t.Errorf("redactURLsIn: %s", got)
	}
}
