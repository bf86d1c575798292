package main

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-composefs/csi-composefs/internal/testoci"
	"github.com/csi-composefs/csi-composefs/internal/testsign"
)

func writeKey(t *testing.T, k testsign.Key) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "cosign.pub")
	if err := os.WriteFile(p, []byte(k.PEM), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestImageVerify(t *testing.T) {
	key, stranger := testsign.NewKey(t), testsign.NewKey(t)
	keyFile, strangerFile := writeKey(t, key), writeKey(t, stranger)
	repo, digest := publishTree(t, "app", 1)
	img := filepath.Join(repo, "images", "app")
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img+".sig", key.SignBlob(t, b), 0o644); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.FileServer(http.Dir(repo)))
	defer srv.Close()

	reg := testoci.NewRegistry(t, testoci.Options{})
	r := testsign.Repository(t, reg.Host, "team/app")
	testoci.Push(t, reg.Host, "team/app:v1", testoci.Image(t, testoci.Layer(t, []testoci.Entry{testoci.File("etc/x", "x")})), "", "")
	m := testsign.Manifest(t, r, "v1")
	key.Sign(t, r, reg.Host+"/team/app", m.Digest.String())
	testoci.Push(t, reg.Host, "team/app:v2", testoci.Image(t, testoci.Layer(t, []testoci.Entry{testoci.File("etc/x", "y")})), "", "")
	m2 := testsign.Manifest(t, r, "v2")
	testsign.AttachBundle(t, r, m2, key.ManifestBundle(t, reg.Host+"/team/app", m2.Digest.String()))
	ref := "docker://" + reg.Host + "/team/app"

	for _, c := range []struct {
		name string
		args []string
		code int
		want string // in stdout (success) or stderr
	}{
		{"file", []string{"--key", keyFile, img}, exitOK, digest},
		{"file, other key", []string{"--key", strangerFile, img}, exitFailure, "does not verify"},
		{"file, two keys", []string{"--key", strangerFile, "--key", keyFile, img}, exitOK, "Verified"},
		{"url", []string{"--key", keyFile, srv.URL + "/images/app"}, exitOK, digest},
		{"url, other key", []string{"--key", strangerFile, srv.URL + "/images/app"}, exitFailure, "does not verify"},
		{"url, unsigned", []string{"--key", keyFile, srv.URL + "/images/none"}, exitFailure, "not signed"},
		{"registry, signature tag", []string{"--insecure-registry", reg.Host, "--key", keyFile, ref + ":v1"}, exitOK, m.Digest.String()},
		{"registry, bundle referrer", []string{"--insecure-registry", reg.Host, "--key", keyFile, ref + ":v2"}, exitOK, m2.Digest.String()},
		{"registry, other key", []string{"--insecure-registry", reg.Host, "--key", strangerFile, ref + ":v1"}, exitFailure, "does not verify"},
		{"registry, unknown tag", []string{"--insecure-registry", reg.Host, "--key", keyFile, ref + ":v9"}, exitFailure, "v9"},
		{"no key", []string{img}, exitUsage, "--key"},
		{"not a key", []string{"--key", img, img}, exitUsage, "--key"},
		{"url without images/", []string{"--key", keyFile, srv.URL + "/app"}, exitUsage, "REPO/images/NAME"},
	} {
		code, stdout, stderr := runCmd(t, append([]string{"image", "verify"}, c.args...)...)
		got := stdout
		if c.code != exitOK {
			got = stderr
		}
		if code != c.code || !strings.Contains(got, c.want) {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want exit %d naming %q", c.name, code, stdout, stderr, c.code, c.want)
		}
	}
	// Unsigned: the image file without .sig.
	os.Remove(img + ".sig")
	if code, _, stderr := runCmd(t, "image", "verify", "--key", keyFile, img); code != exitFailure || !strings.Contains(stderr, "not signed") {
		t.Errorf("unsigned file: exit %d, %s", code, stderr)
	}
}
