package driver

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/pem"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/internal/testrepo"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// syncBuffer is a log sink safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// captureLogs runs klog as the plugin does (its own backend, the flags
// serve registers) at -v=v, writing to a buffer until the test ends. Every
// logger of the driver and of its gRPC interceptor derives from it. Call it
// before making the driver.
func captureLogs(t *testing.T, v int) *syncBuffer {
	buf := &syncBuffer{}
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	for k, val := range map[string]string{"logtostderr": "false", "alsologtostderr": "false", "stderrthreshold": "FATAL", "v": strconv.Itoa(v)} {
		if err := fs.Set(k, val); err != nil {
			t.Fatal(err)
		}
	}
	klog.SetOutput(buf)
	t.Cleanup(func() {
		klog.Flush()
		fs.Set("v", "0")
		fs.Set("logtostderr", "true")
		klog.SetOutput(os.Stderr)
	})
	return buf
}

// serveGRPC serves d with its production gRPC server (LogInterceptor
// included) on a unix socket and returns a Node client of it.
func serveGRPC(t *testing.T, d *Driver) csi.NodeClient {
	t.Helper()
	dir, err := os.MkdirTemp("", "csi") // short: a socket path has ~100 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "csi.sock")
	l, err := Listen("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	gs := d.NewGRPCServer()
	go func() { _ = gs.Serve(l) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return csi.NewNodeClient(conn)
}

// encodings are the forms in which a secret could show up in a log line.
func encodings(s string) []string {
	q := strconv.Quote(s)
	return []string{s, base64.StdEncoding.EncodeToString([]byte(s)), base64.RawStdEncoding.EncodeToString([]byte(s)),
		base64.URLEncoding.EncodeToString([]byte(s)), base64.RawURLEncoding.EncodeToString([]byte(s)),
		url.QueryEscape(s), url.PathEscape(s), q[1 : len(q)-1]}
}

// TestNoSecretsLeaveTheProcess runs the driver over gRPC with the real
// LogInterceptor and every logger at V(5), publishes volumes with a token,
// basic auth, a .dockerconfigjson, kubelet's service account token and a
// repository that redirects to a pre-signed URL with userinfo, and checks
// that no secret, raw, base64- or URL-encoded, is in the log, in a gRPC
// error or in a pod event.
func TestNoSecretsLeaveTheProcess(t *testing.T) {
	logs := captureLogs(t, 5)
	const (
		token    = "tok-Sekr3t/+=A"
		badToken = "tok-Sekr3t/+=B\nX-Injected: 1"
		pw       = "pw-Sekr3t/+=C"
		dcPw     = "dc-Sekr3t/+=D"
		redirPw  = "rd-Sekr3t/+=E"
		sig      = "sig0Sekr3tF"
		keyID    = "AKIASEKR3TG"
		saToken  = "sa-Sekr3t.H"
	)
	secrets := []string{token, badToken, pw, dcPw, redirPw, sig, keyID, saToken,
		"u:" + pw, "dcuser:" + dcPw, "user:" + redirPw, "Bearer " + token}

	refused := httptest.NewServer(http.NotFoundHandler())
	defer refused.Close()
	refusedHost := strings.TrimPrefix(refused.URL, "http://")
	dir := t.TempDir()
	dg := testrepo.Publish(t, dir, "app", sampleFiles(31))
	files := http.FileServer(http.Dir(dir))
	var requests atomic.Int32
	repo := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		switch r.Header.Get("Authorization") {
		case "Bearer " + token, "Basic " + base64.StdEncoding.EncodeToString([]byte("u:"+pw)),
			"Basic " + base64.StdEncoding.EncodeToString([]byte("dcuser:"+dcPw)):
		default:
			http.Error(w, "who are you", http.StatusUnauthorized)
			return
		}
		if r.URL.Path == "/images/redirected.cfs" {
			http.Redirect(w, r, "http://user:"+url.QueryEscape(redirPw)+"@"+refusedHost+"/x?X-Amz-Signature="+sig+"&X-Amz-Credential="+keyID, http.StatusFound)
			return
		}
		files.ServeHTTP(w, r)
	}))
	defer repo.Close()
	repoHost := strings.TrimPrefix(repo.URL, "http://")

	al, err := ParseAllowList(repo.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	rec := &fakeRecorder{}
	e := newTestEnv(t, Config{AllowedSources: al}, WithEventRecorder(rec))
	client := serveGRPC(t, e.d)
	vc := func(extra ...string) map[string]string {
		m := map[string]string{
			"repository":                  repo.URL,
			"csi.storage.k8s.io/pod.name": "web-0", "csi.storage.k8s.io/pod.namespace": "shop",
			"csi.storage.k8s.io/serviceAccount.tokens": `{"repo":{"token":"` + saToken + `","expirationTimestamp":"2030-01-01T00:00:00Z"}}`,
		}
		for i := 0; i < len(extra); i += 2 {
			m[extra[i]] = extra[i+1]
		}
		return m
	}
	dockerConfig := fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, repoHost, base64.StdEncoding.EncodeToString([]byte("dcuser:"+dcPw)))
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	var answers []string
	for _, c := range []struct {
		name    string
		vc      map[string]string
		secrets map[string]string
		code    codes.Code
	}{
		{"redirect to a pre-signed URL elsewhere", vc("image", "redirected.cfs"), map[string]string{"token": token}, codes.PermissionDenied},
		{"docker config, missing image", vc("image", "missing.cfs"), map[string]string{".dockerconfigjson": dockerConfig}, codes.NotFound},
		{"newline in the token", vc("image", "app"), map[string]string{"token": badToken}, codes.InvalidArgument},
		{"basic auth", vc("digest", dg.String()), map[string]string{"username": "u", "password": pw}, codes.OK},
	} {
		before := requests.Load()
		req := publishReq("v-"+strings.ReplaceAll(c.name, " ", "-"), target, c.vc)
		req.Secrets = c.secrets
		_, err := client.NodePublishVolume(context.Background(), req)
		if c.code == codes.OK && os.Geteuid() != 0 {
			c.code = status.Code(err) // the fetch is logged; mounting needs root
		}
		if status.Code(err) != c.code {
			t.Errorf("%s: %v, want %v", c.name, err, c.code)
		}
		if err != nil {
			answers = append(answers, err.Error())
		}
		if c.code == codes.InvalidArgument && (requests.Load() != before || !strings.Contains(err.Error(), `"token"`)) {
			t.Errorf("%s: %v after %d requests, want InvalidArgument naming the token and no request", c.name, err, requests.Load()-before)
		}
	}
	if _, err := client.NodeUnpublishVolume(context.Background(), unpublishReq("v-basic-auth", target)); err != nil {
		t.Error(err)
	}
	rec.mu.Lock()
	var events []string
	for _, ev := range rec.events {
		events = append(events, ev.message)
	}
	rec.mu.Unlock()

	klog.Flush()
	log := logs.String()
	// The capture must have seen the interceptor and the refusal, or the
	// checks below would pass on an empty log.
	for _, want := range []string{`"gRPC call"`, "volume_context_keys", "gRPC call failed", "REDACTED@" + refusedHost + "/x?REDACTED"} {
		if !strings.Contains(log, want) {
			t.Errorf("the V(5) log lacks %q:\n%s", want, log)
		}
	}
	if len(events) < 2 || !strings.Contains(strings.Join(answers, "\n"), "REDACTED@"+refusedHost) {
		t.Errorf("events %q, answers %q: want the refused redirect named, redacted", events, answers)
	}
	for where, text := range map[string]string{"log": log, "gRPC errors": strings.Join(answers, "\n"), "events": strings.Join(events, "\n")} {
		for _, s := range secrets {
			for _, enc := range encodings(s) {
				if strings.Contains(text, enc) {
					t.Errorf("%s show the secret %q (as %q)", where, s, enc)
				}
			}
		}
	}
}

// TestFinalCodesOfRefusedRedirects: a publish whose repository redirects
// outside the allowed sources, from https to http, or in a loop fails at
// once with a final code, after one request (the store would retry a
// transient failure 3 times here) and without reaching the refused target.
func TestFinalCodesOfRefusedRedirects(t *testing.T) {
	var reached atomic.Int32
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { reached.Add(1) }))
	defer elsewhere.Close()
	for _, tt := range []struct {
		name string
		tls  bool
		to   func(r *http.Request) string
		code codes.Code
		msg  string
	}{
		{"outside the allowed sources", false, func(r *http.Request) string { return elsewhere.URL + r.URL.Path }, codes.PermissionDenied, "not an allowed source"},
		{"https to http", true, func(r *http.Request) string { return elsewhere.URL + r.URL.Path }, codes.PermissionDenied, "from https to"},
		{"loop", false, func(r *http.Request) string {
			if strings.HasPrefix(r.URL.Path, "/images/") {
				return "/again" + r.URL.Path
			}
			return strings.TrimPrefix(r.URL.Path, "/again")
		}, codes.FailedPrecondition, "redirect loop"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			reached.Store(0)
			var requests atomic.Int32
			h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				requests.Add(1)
				http.Redirect(w, r, tt.to(r), http.StatusFound)
			})
			var repo *httptest.Server
			secrets := map[string]string{}
			if tt.tls {
				repo = httptest.NewTLSServer(h)
				secrets["ca.crt"] = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: repo.Certificate().Raw}))
			} else {
				repo = httptest.NewServer(h)
			}
			defer repo.Close()
			al, _ := ParseAllowList(repo.URL + "/")
			e := &testEnv{t: t, root: t.TempDir(), storeOpts: fetch.Options{Retries: 3, RetryBaseDelay: time.Millisecond, RetryMaxDelay: time.Millisecond}}
			e.open(Config{AllowedSources: al})
			req := publishReq("v", filepath.Join(t.TempDir(), "vol"), map[string]string{"repository": repo.URL, "image": "app"})
			req.Secrets = secrets
			_, err := e.d.NodePublishVolume(context.Background(), req)
			if status.Code(err) != tt.code || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("got %v, want %v saying %q", err, tt.code, tt.msg)
			}
			if n, max := requests.Load(), int32(1); tt.name == "loop" && n != 2 || tt.name != "loop" && n != max {
				t.Errorf("%d requests to the repository: retried?", n)
			}
			if reached.Load() != 0 {
				t.Error("the refused target was reached")
			}
		})
	}
}

// TestUnansweredServerAnswersItsFailure: a repository that accepts
// connections and never sends headers is a transient failure (Unavailable,
// with the reason), not Aborted; and when kubelet's deadline came first,
// its retry is told the failure, not "in progress" by a fetch started over.
func TestUnansweredServerAnswersItsFailure(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int32
	done := make(chan struct{})
	var conns sync.WaitGroup
	t.Cleanup(func() { close(done); l.Close(); conns.Wait() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			conns.Add(1)
			go func() { defer conns.Done(); <-done; c.Close() }()
		}
	}()
	headerTimeout := 50 * time.Millisecond
	factory := func(spec SourceSpec, _ Credentials) (fetch.Source, error) {
		return fetch.NewHTTPSource(spec.URL, fetch.HTTPOptions{ResponseHeaderTimeout: headerTimeout})
	}
	e := newTestEnv(t, Config{WaitMargin: 50 * time.Millisecond}, WithSourceFactory(factory))
	vc := map[string]string{"repository": "http://" + l.Addr().String(), "image": "app"}
	target := filepath.Join(t.TempDir(), "vol")

	_, err = e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc))
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "response headers") {
		t.Fatalf("got %v, want Unavailable naming the missing response headers", err)
	}

	// Now the fetch outlives the caller's deadline.
	headerTimeout = 600 * time.Millisecond
	e.d.sources = map[string]fetch.Source{}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err = e.d.NodePublishVolume(ctx, publishReq("v", target, vc))
	cancel()
	if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "in progress") {
		t.Fatalf("got %v, want Aborted while the fetch runs", err)
	}
	for e.d.ops.inFlight() > 0 {
		time.Sleep(10 * time.Millisecond)
	}
	n := accepted.Load()
	ctx, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err = e.d.NodePublishVolume(ctx, publishReq("v", target, vc))
	cancel()
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "response headers") {
		t.Fatalf("retry after the fetch failed: %v, want Unavailable naming the missing response headers", err)
	}
	if accepted.Load() != n {
		t.Error("the retry started the failed fetch over instead of reporting it")
	}
}
