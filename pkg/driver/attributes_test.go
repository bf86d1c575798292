package driver

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

const testDigest = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestParseVolumeContext(t *testing.T) {
	dg, _ := cfs.ParseDigest(testDigest)
	tests := []struct {
		name    string
		vc      map[string]string
		want    VolumeSpec
		errCode codes.Code
		errHas  string // the field the error must name
	}{
		{
			name: "name only",
			vc:   map[string]string{"repository": "https://Repo.Example.com/team/", "image": "app.cfs"},
			want: VolumeSpec{Source: SourceSpec{SourceHTTP, "https://repo.example.com/team"},
				Ref: fetch.ImageRef{Name: "app.cfs"}, PullPolicy: PullIfNotPresent},
		},
		{
			name: "digest, policy, verity and kubelet keys",
			vc: map[string]string{"repository": "http://10.0.0.1:8080", "digest": testDigest, "pullPolicy": "Never",
				"verity": "off", "csi.storage.k8s.io/pod.name": "p", "csi.storage.k8s.io/pod.namespace": "ns",
				"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/serviceAccount.name": "sa"},
			want: VolumeSpec{Source: SourceSpec{SourceHTTP, "http://10.0.0.1:8080"}, Ref: fetch.ImageRef{Digest: dg},
				PullPolicy: PullNever, Verity: cfs.VerityOff, Pod: PodInfo{Name: "p", Namespace: "ns", Ephemeral: true}},
		},
		{
			name: "sha256: prefix accepted",
			vc:   map[string]string{"repository": "https://r", "image": "a", "digest": "sha256:" + testDigest, "pullPolicy": "Always", "verity": "require"},
			want: VolumeSpec{Source: SourceSpec{SourceHTTP, "https://r"}, Ref: fetch.ImageRef{Name: "a", Digest: dg},
				PullPolicy: PullAlways, Verity: cfs.VerityRequire},
		},
		{name: "unknown key", vc: map[string]string{"repository": "https://r", "image": "a", "imgae": "b"}, errCode: codes.InvalidArgument, errHas: `"imgae"`},
		{name: "no repository", vc: map[string]string{"image": "a"}, errCode: codes.InvalidArgument, errHas: "repository"},
		{name: "bad scheme", vc: map[string]string{"repository": "ftp://r", "image": "a"}, errCode: codes.InvalidArgument, errHas: "repository"},
		{name: "credentials in URL", vc: map[string]string{"repository": "https://u:secretpw@r", "image": "a"}, errCode: codes.InvalidArgument, errHas: "repository"},
		{name: "query", vc: map[string]string{"repository": "https://r/?x=1", "image": "a"}, errCode: codes.InvalidArgument, errHas: "repository"},
		{name: "host not ASCII", vc: map[string]string{"repository": "http://\xb7", "image": "a"}, errCode: codes.InvalidArgument, errHas: "repository: the host must be ASCII"},
		{name: "no image nor digest", vc: map[string]string{"repository": "https://r"}, errCode: codes.InvalidArgument, errHas: "image"},
		{name: "bad image name", vc: map[string]string{"repository": "https://r", "image": "../x"}, errCode: codes.InvalidArgument, errHas: "image"},
		{name: "bad digest", vc: map[string]string{"repository": "https://r", "digest": "abc"}, errCode: codes.InvalidArgument, errHas: "digest"},
		{name: "all-zero digest", vc: map[string]string{"repository": "https://r", "image": "a", "digest": strings.Repeat("0", 64)}, errCode: codes.InvalidArgument, errHas: "digest: want the image's fs-verity digest"},
		{name: "all-zero digest with prefix", vc: map[string]string{"repository": "https://r", "digest": "sha256:" + strings.Repeat("0", 64)}, errCode: codes.InvalidArgument, errHas: "not all zero"},
		{name: "bad pull policy", vc: map[string]string{"repository": "https://r", "image": "a", "pullPolicy": "Sometimes"}, errCode: codes.InvalidArgument, errHas: "pullPolicy"},
		{name: "bad verity", vc: map[string]string{"repository": "https://r", "image": "a", "verity": "maybe"}, errCode: codes.InvalidArgument, errHas: "verity"},
		{name: "empty verity", vc: map[string]string{"repository": "https://r", "image": "a", "verity": ""}, errCode: codes.InvalidArgument, errHas: "verity"},
		{name: "require without digest", vc: map[string]string{"repository": "https://r", "image": "a", "verity": "require"}, errCode: codes.InvalidArgument, errHas: "digest"},
		{name: "too large", vc: map[string]string{"repository": "https://r", "image": "a", "csi.storage.k8s.io/x": strings.Repeat("x", 4100)}, errCode: codes.InvalidArgument, errHas: "4096"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseVolumeContext(tt.vc)
			if tt.errCode != codes.OK {
				if status.Code(err) != tt.errCode || !strings.Contains(err.Error(), tt.errHas) {
					t.Fatalf("error %v, want code %v naming %s", err, tt.errCode, tt.errHas)
				}
				if strings.Contains(err.Error(), "secretpw") {
					t.Fatalf("error leaks a credential: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestParseSecrets(t *testing.T) {
	tests := []struct {
		name    string
		secrets map[string]string
		want    Credentials
		errHas  string
	}{
		{name: "none", secrets: nil},
		{name: "basic", secrets: map[string]string{"username": "u", "password": "p"}, want: Credentials{Username: "u", Password: "p"}},
		{name: "token", secrets: map[string]string{"token": " t\n"}, want: Credentials{Token: "t"}},
		{name: "docker config", secrets: map[string]string{".dockerconfigjson": `{"auths":{}}`}, want: Credentials{DockerConfig: []byte(`{"auths":{}}`)}},
		{name: "unknown key", secrets: map[string]string{"passwd": "hunter2"}, errHas: `"passwd"`},
		{name: "bad CA", secrets: map[string]string{"ca.crt": "hunter2"}, errHas: "ca.crt"},
		{name: "bad docker config", secrets: map[string]string{".dockerconfigjson": "hunter2"}, errHas: ".dockerconfigjson"},
		{name: "password alone", secrets: map[string]string{"password": "hunter2"}, errHas: "username"},
		{name: "newline inside the token", secrets: map[string]string{"token": "hunter2\nX-Injected: 1\n"}, errHas: `"token"`},
		{name: "NUL in the token", secrets: map[string]string{"token": "hunter2\x00"}, errHas: `"token"`},
		{name: "CR in the password", secrets: map[string]string{"username": "u", "password": "hunter2\r\n"}, errHas: `"password"`},
		{name: "tab in the username", secrets: map[string]string{"username": "hunter2\t"}, errHas: `"username"`},
		{name: "colon in the username", secrets: map[string]string{"username": "hunter2:x", "password": "p"}, errHas: `"username"`},
		{name: "docker auth not base64", secrets: map[string]string{".dockerconfigjson": `{"auths":{"r.example":{"auth":"hunter2!"}}}`}, errHas: `auths["r.example"]: auth is not base64`},
		{name: "docker auth without colon", secrets: map[string]string{".dockerconfigjson": `{"auths":{"r":{"auth":"aHVudGVyMg=="}}}`}, errHas: "user:password"},
		{name: "docker password with a newline", secrets: map[string]string{".dockerconfigjson": `{"auths":{"r":{"username":"u","password":"hunter2\n"}}}`}, errHas: "control character"},
		{name: "docker auth with a newline", secrets: map[string]string{".dockerconfigjson": `{"auths":{"r":{"auth":"dTpodW50ZXIyCg=="}}}`}, errHas: "control character"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSecrets(tt.secrets)
			if tt.errHas != "" {
				if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tt.errHas) {
					t.Fatalf("error %v, want InvalidArgument naming %s", err, tt.errHas)
				}
				if strings.Contains(err.Error(), "hunter2") {
					t.Fatalf("error leaks a secret: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.fingerprint() != tt.want.fingerprint() {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestDockerConfigAuth(t *testing.T) {
	raw := []byte(`{"auths":{"https://repo.example.com":{"auth":"dTpw"},"other:5000":{"username":"a","password":"b"}}}`)
	for _, tt := range []struct {
		host, user, pass string
		ok               bool
	}{
		{"repo.example.com", "u", "p", true},
		{"other:5000", "a", "b", true},
		{"nowhere", "", "", false},
	} {
		u, p, ok := dockerConfigAuth(raw, tt.host)
		if u != tt.user || p != tt.pass || ok != tt.ok {
			t.Errorf("%s: got %q %q %v", tt.host, u, p, ok)
		}
	}
}

func TestAllowList(t *testing.T) {
	al, err := ParseAllowList(" https://Repo.example.com/ , https://h/team,oci://registry.example.com/team/")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		url  string
		want bool
	}{
		{"https://repo.example.com", true},
		{"https://repo.example.com/a/b", true},
		{"https://repo.example.com.evil.net", false},
		{"http://repo.example.com", false},
		{"https://h/team", true},
		{"https://h/team/app", true},
		{"https://h/teamx", false},
		{"https://h", false},
	} {
		if got := al.Allows(SourceSpec{SourceHTTP, tt.url}); got != tt.want {
			t.Errorf("%s: got %v, want %v", tt.url, got, tt.want)
		}
	}
	if !(AllowList(nil)).Allows(SourceSpec{SourceHTTP, "https://anything"}) {
		t.Error("an empty list must allow everything")
	}
	if _, err := ParseAllowList("repo.example.com"); err == nil {
		t.Error("a prefix without scheme must be refused")
	}
}

func TestEffectiveVerity(t *testing.T) {
	for _, tt := range []struct{ asked, floor, want cfs.VerityMode }{
		{"", cfs.VerityOff, cfs.VerityUserspace},
		{cfs.VerityOff, cfs.VerityOff, cfs.VerityOff},
		{cfs.VerityOff, cfs.VerityUserspace, cfs.VerityUserspace},
		{cfs.VerityUserspace, cfs.VerityRequire, cfs.VerityRequire},
		{cfs.VerityRequire, cfs.VerityOff, cfs.VerityRequire},
	} {
		if got := effectiveVerity(tt.asked, tt.floor); got != tt.want {
			t.Errorf("effectiveVerity(%q, %q) = %q, want %q", tt.asked, tt.floor, got, tt.want)
		}
	}
}

func TestErrorCode(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("ensuring image x: %w", err) }
	for _, tt := range []struct {
		name string
		err  error
		want codes.Code
	}{
		{"nil", nil, codes.OK},
		{"status passes", status.Error(codes.PermissionDenied, "x"), codes.PermissionDenied},
		{"404", wrap(&fetch.SourceError{Op: "fetching image", URL: "u", Status: 404, Err: fetch.ErrNotFound}), codes.NotFound},
		{"401", wrap(&fetch.SourceError{Status: 401, Err: fetch.ErrUnauthorized}), codes.PermissionDenied},
		{"digest mismatch", wrap(fetch.ErrDigestMismatch), codes.FailedPrecondition},
		{"size mismatch", wrap(fetch.ErrSizeMismatch), codes.FailedPrecondition},
		{"invalid image", wrap(fetch.ErrInvalidImage), codes.FailedPrecondition},
		{"mount digest mismatch", wrap(cfs.ErrImageDigestMismatch), codes.FailedPrecondition},
		{"no verity", wrap(cfs.ErrVerityUnsupported), codes.FailedPrecondition},
		{"pull never", wrap(errNotOnNode), codes.FailedPrecondition},
		{"disk full", wrap(syscall.ENOSPC), codes.ResourceExhausted},
		{"object over the node limit", wrap(fmt.Errorf("object x is 9 bytes: %w", fetch.ErrResourceLimit)), codes.ResourceExhausted},
		{"tree over the parse memory", wrap(fmt.Errorf("image x: %w: %w", cfs.ErrTooLarge, fetch.ErrResourceLimit)), codes.ResourceExhausted},
		{"transient exhausted", wrap(fetch.Transient(errors.New("503"))), codes.Unavailable},
		{"deadline", wrap(context.DeadlineExceeded), codes.Aborted},
		{"canceled", wrap(context.Canceled), codes.Aborted},
		{"redirect refused", wrap(&fetch.SourceError{Err: fmt.Errorf("to x: %w", fetch.ErrRedirectRefused)}), codes.PermissionDenied},
		{"redirect loop", wrap(&fetch.SourceError{Err: fmt.Errorf("loop: %w", fetch.ErrRedirectLoop)}), codes.FailedPrecondition},
		{"invalid credentials", wrap(fetch.ErrInvalidCredentials), codes.InvalidArgument},
		{"other", errors.New("boom"), codes.Internal},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := errorCode(tt.err); got != tt.want {
				t.Fatalf("errorCode(%v) = %v, want %v", tt.err, got, tt.want)
			}
			if tt.err != nil {
				st := toStatus("publishing", tt.err)
				if status.Code(st) != tt.want {
					t.Fatalf("toStatus code %v, want %v", status.Code(st), tt.want)
				}
			}
		})
	}
	for c, final := range map[codes.Code]bool{codes.Aborted: false, codes.Unavailable: false,
		codes.ResourceExhausted: false, codes.NotFound: true, codes.InvalidArgument: true, codes.Internal: true} {
		if isFinal(c) != final {
			t.Errorf("isFinal(%v) = %v", c, !final)
		}
	}
}

func TestRedactRequest(t *testing.T) {
	req := &csi.NodePublishVolumeRequest{
		VolumeId:      "v1",
		TargetPath:    "/t",
		Secrets:       map[string]string{"token": "hunter2"},
		VolumeContext: map[string]string{"repository": "https://r", "csi.storage.k8s.io/serviceAccount.tokens": "tok3n"},
	}
	got := redactRequest(req)
	for _, leak := range []string{"hunter2", "tok3n", "https://r"} {
		if strings.Contains(got, leak) {
			t.Errorf("logged request leaks %q: %s", leak, got)
		}
	}
	for _, want := range []string{"v1", "/t", "repository", "serviceAccount.tokens"} {
		if !strings.Contains(got, want) {
			t.Errorf("logged request lacks %q: %s", want, got)
		}
	}
	if len(req.Secrets) != 1 || len(req.VolumeContext) != 2 {
		t.Error("redactRequest modified the request")
	}
}

// TestRepositoryPathCannotClimb refuses dot segments, also percent-encoded,
// which a server would resolve after the allow-list had said yes.
func TestRepositoryPathCannotClimb(t *testing.T) {
	al, err := ParseAllowList("https://h/team/")
	if err != nil {
		t.Fatal(err)
	}
	for _, repo := range []string{
		"https://h/team/%2e%2e/other", "https://h/team/%2E%2E/%2e%2e/x", "https://h/team/../other",
		"https://h/team/./x", "https://h/team/a%2fb", "https://h/team/a%5cb",
	} {
		spec, err := ParseVolumeContext(map[string]string{"repository": repo, "image": "a.cfs"})
		if err == nil {
			t.Errorf("%s accepted as %s (allowed: %v)", repo, spec.Source.URL, al.Allows(spec.Source))
			continue
		}
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "repository") {
			t.Errorf("%s: %v, want InvalidArgument naming repository", repo, err)
		}
	}
}

// TestRedirectsStayInsideTheAllowList follows a redirect only to an allowed
// source, and never from https to http.
func TestRedirectsStayInsideTheAllowList(t *testing.T) {
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("not a composefs image"))
	}))
	defer other.Close()
	repo := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL+"/elsewhere"+r.URL.Path, http.StatusFound)
	}))
	defer repo.Close()
	al, err := ParseAllowList(repo.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	src, err := al.NewSource(SourceSpec{Kind: SourceHTTP, URL: repo.URL}, Credentials{})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = src.OpenImage(context.Background(), fetch.ImageRef{Name: "a.cfs"})
	if err == nil || !strings.Contains(err.Error(), "not an allowed source") {
		t.Fatalf("redirect to another host: %v, want it refused", err)
	}
	// With the target allowed too, the redirect is followed.
	al2, _ := ParseAllowList(repo.URL + "/," + other.URL + "/elsewhere/")
	src2, _ := al2.NewSource(SourceSpec{Kind: SourceHTTP, URL: repo.URL}, Credentials{})
	rc, _, err := src2.OpenImage(context.Background(), fetch.ImageRef{Name: "a.cfs"})
	if err != nil {
		t.Fatalf("allowed redirect: %v", err)
	}
	rc.Close()
}
