package driver

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// fuzzMap decodes key\x00value\x00key\x00value… (values may hold newlines).
func fuzzMap(b []byte) map[string]string {
	parts := bytes.Split(b, []byte{0})
	m := make(map[string]string, len(parts)/2)
	for i := 0; i+1 < len(parts); i += 2 {
		m[string(parts[i])] = string(parts[i+1])
	}
	return m
}

func fuzzBlob(kv ...string) []byte { return []byte(strings.Join(kv, "\x00")) }

// FuzzParseVolumeContext: any volume context is either refused with
// InvalidArgument, or gives a volume whose source URL is canonical (parsing
// it again gives it back) and carries no userinfo, query or fragment.
func FuzzParseVolumeContext(f *testing.F) {
	hex := strings.Repeat("ab", 32)
	for _, seed := range [][]byte{
		fuzzBlob("repository", "https://repo.example/team/app", "image", "app-1.2.cfs", "digest", hex),
		fuzzBlob("repository", "http://10.0.0.1:8080", "digest", "sha256:"+hex, "pullPolicy", "Never", "verity", "require"),
		fuzzBlob("repository", "https://h/%2e%2e/x", "image", "a", "csi.storage.k8s.io/pod.name", "p", "csi.storage.k8s.io/ephemeral", "true"),
		fuzzBlob("repository", "https://u:p@h/", "image", "a?b", "pullPolicy", "Always", "verity", "off"),
		fuzzBlob("repository", "HTTPS://H/A/./B/", "digest", strings.Repeat("0", 64)),
		fuzzBlob("csi.storage.k8s.io/serviceAccount.tokens", `{"a":{"token":"t"}}`, "repository", "https://h", "image", ".."),
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		vc := fuzzMap(b)
		spec, err := ParseVolumeContext(vc)
		if err != nil {
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("error %v is not InvalidArgument", err)
			}
			return
		}
		again, err := canonicalHTTPURL(spec.Source.URL)
		if err != nil || again != spec.Source.URL {
			t.Fatalf("source URL %q is not canonical: %q, %v", spec.Source.URL, again, err)
		}
		u, err := url.Parse(spec.Source.URL)
		if err != nil || u.User != nil || u.RawQuery != "" || u.Fragment != "" || fetch.RedactURL(spec.Source.URL) != spec.Source.URL {
			t.Fatalf("source URL %q carries userinfo, a query or a fragment", spec.Source.URL)
		}
		if spec.Ref.Name == "" && spec.Ref.Digest.IsZero() {
			t.Fatal("a volume with neither image nor digest")
		}
		if d, ok := vc[AttrDigest]; ok && d != "" && spec.Ref.Digest.IsZero() {
			t.Fatalf("digest %q accepted as no digest", d)
		}
		if spec.Ref.Name != "" && fetch.ValidImageName(spec.Ref.Name) != nil {
			t.Fatalf("image name %q accepted", spec.Ref.Name)
		}
	})
}

// FuzzParseSecrets: any secret is either refused with InvalidArgument
// without quoting a value, or gives credentials that an HTTP source can
// send (ParseSecrets and the source agree on what is valid), also those a
// .dockerconfigjson holds for each of its registries.
func FuzzParseSecrets(f *testing.F) {
	for _, seed := range [][]byte{
		fuzzBlob("token", "abc.def\n"),
		fuzzBlob("username", "u", "password", "p w"),
		fuzzBlob("token", "a\nb"),
		fuzzBlob(".dockerconfigjson", `{"auths":{"r.example:5000":{"auth":"dTpw"}}}`),
		fuzzBlob(".dockerconfigjson", `{"auths":{"https://r.example":{"username":"u","password":"p"},"r2":{"auth":"!!"}}}`),
		fuzzBlob(".dockerconfigjson", `{"auths":{"r":{"auth":"dTpwCg=="}}}`, "ca.crt", "-----BEGIN CERTIFICATE-----\n"),
		fuzzBlob("passwd", "x"),
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		secrets := fuzzMap(b)
		c, err := ParseSecrets(secrets)
		if err != nil {
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("error %v is not InvalidArgument", err)
			}
			// The message names keys (also known ones, and unknown ones
			// given, quoted): a value found in a key's name, as given or
			// as quoted (a run of backslashes doubles), is not a leak.
			names := strings.Join([]string{SecretUsername, SecretPassword, SecretToken, SecretCA, SecretDockerConfig}, " ")
			for k := range secrets {
				names += " " + k + " " + strconv.Quote(k)
			}
			for _, v := range secrets {
				if len(v) >= 8 && strings.Contains(err.Error(), v) && !strings.Contains(names, v) {
					t.Fatalf("error %q quotes a secret value", err)
				}
			}
			return
		}
		check := func(what string, opts fetch.HTTPOptions) {
			opts.Transport = http.DefaultTransport // not one built (and its CA pool loaded) per input
			if _, err := fetch.NewHTTPSource("https://r.example/", opts); errors.Is(err, fetch.ErrInvalidCredentials) {
				t.Fatalf("ParseSecrets accepted %s the source cannot send: %v", what, err)
			}
		}
		check("credentials", fetch.HTTPOptions{Username: c.Username, Password: c.Password, BearerToken: c.Token})
		if len(c.DockerConfig) == 0 {
			return
		}
		var dc dockerConfig
		if err := json.Unmarshal(c.DockerConfig, &dc); err != nil {
			t.Fatalf("accepted a .dockerconfigjson that is not JSON: %v", err)
		}
		for k := range dc.Auths {
			host := k
			if u, err := url.Parse(k); err == nil && u.Host != "" {
				host = u.Host
			}
			if user, pass, ok := dockerConfigAuth(c.DockerConfig, host); ok {
				check(".dockerconfigjson credentials", fetch.HTTPOptions{Username: user, Password: pass})
			}
		}
	})
}
