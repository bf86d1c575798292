package registry

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	"github.com/distribution/distribution/v3/registry/storage"
	"github.com/distribution/distribution/v3/registry/storage/driver/factory"
	"github.com/sirupsen/logrus"
	"golang.org/x/crypto/bcrypt"

	// The htpasswd access controller and the filesystem storage driver
	// register themselves.
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
)

// distRegistry is distribution's registry in this process: TLS (a CA of
// its own), htpasswd basic auth, the filesystem storage driver, deletes
// enabled (so that tags can be removed before a garbage collection).
type distRegistry struct {
	srv     *httptest.Server
	host    string // 127.0.0.1:PORT
	root    string // the storage driver's root directory
	caFile  string // PEM of the server's certificate
	caPEM   []byte
	user    string
	pass    string
	passwd  string // a file holding pass
	authDir string // DOCKER_CONFIG folder with config.json for user

	mu        sync.Mutex
	requests  int
	denied    int
	blobGets  int
	blobBytes int64 // bytes of blob GET bodies
}

var quietLogs sync.Once

func newDistRegistry(t *testing.T) *distRegistry {
	t.Helper()
	quietLogs.Do(func() {
		logrus.SetOutput(io.Discard)
		logrus.SetLevel(logrus.ErrorLevel)
	})
	dir := t.TempDir()
	r := &distRegistry{root: filepath.Join(dir, "storage"), user: "alice", pass: "correct horse"}
	hash, err := bcrypt.GenerateFromPassword([]byte(r.pass), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	htpasswd := filepath.Join(dir, "htpasswd")
	writeFile(t, htpasswd, r.user+":"+string(hash)+"\n")
	cfg := &configuration.Configuration{
		Storage: configuration.Storage{
			"filesystem":  configuration.Parameters{"rootdirectory": r.root},
			"delete":      configuration.Parameters{"enabled": true},
			"maintenance": configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}},
		},
		Auth: configuration.Auth{"htpasswd": configuration.Parameters{"realm": "csi-composefs-test", "path": htpasswd}},
	}
	cfg.HTTP.Secret = "test-upload-secret"
	ctx, cancel := context.WithCancel(context.Background())
	app := handlers.NewApp(ctx, cfg)
	r.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		cw := &codeWriter{ResponseWriter: w}
		app.ServeHTTP(cw, req)
		r.mu.Lock()
		r.requests++
		if req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/blobs/") {
			r.blobGets++
			r.blobBytes += cw.n
		}
		if cw.code == http.StatusUnauthorized && req.Header.Get("Authorization") != "" {
			r.denied++
		}
		r.mu.Unlock()
	}))
	r.srv.StartTLS()
	t.Cleanup(func() {
		r.srv.Close()
		cancel()
	})
	r.host = strings.TrimPrefix(r.srv.URL, "https://")
	r.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.srv.Certificate().Raw})
	r.caFile = filepath.Join(dir, "ca.crt")
	writeFile(t, r.caFile, string(r.caPEM))
	r.passwd = filepath.Join(dir, "password")
	writeFile(t, r.passwd, r.pass+"\n")
	r.authDir = filepath.Join(dir, "docker")
	writeFile(t, filepath.Join(r.authDir, "config.json"), string(r.dockerConfig(r.pass)))
	return r
}

// dockerConfig is a .dockerconfigjson for the registry (a Kubernetes
// pull secret's content) with the given password.
func (r *distRegistry) dockerConfig(pass string) []byte {
	auth := base64.StdEncoding.EncodeToString([]byte(r.user + ":" + pass))
	b, _ := json.Marshal(map[string]any{"auths": map[string]any{r.host: map[string]string{"auth": auth}}})
	return b
}

// secrets are a volume's nodePublishSecretRef data for the registry.
func (r *distRegistry) secrets(pass string) map[string]string {
	return map[string]string{".dockerconfigjson": string(r.dockerConfig(pass)), "ca.crt": string(r.caPEM)}
}

func (r *distRegistry) counts() (requests, denied int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.requests, r.denied
}

// blobs are the blob GETs served and their bytes.
func (r *distRegistry) blobs() (gets int, bytes int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.blobGets, r.blobBytes
}

func (r *distRegistry) reset() {
	r.mu.Lock()
	r.requests, r.denied, r.blobGets, r.blobBytes = 0, 0, 0, 0
	r.mu.Unlock()
}

// deleteTag removes a tag's manifest (by digest, as the API wants), so
// that a garbage collection may collect what only it referenced.
func (r *distRegistry) deleteManifest(t *testing.T, repo, digest string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodDelete, fmt.Sprintf("%s/v2/%s/manifests/%s", r.srv.URL, repo, digest), nil)
	req.SetBasicAuth(r.user, r.pass)
	resp, err := r.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("deleting %s@%s: %s", repo, digest, resp.Status)
	}
}

// gc runs distribution's garbage collector (registry garbage-collect
// --delete-untagged) on the storage, between requests. It returns the
// blobs it removed (by listing the blob store before and after).
func (r *distRegistry) gc(t *testing.T) int {
	t.Helper()
	before := r.blobCount(t)
	ctx := context.Background()
	d, err := factory.Create(ctx, "filesystem", map[string]any{"rootdirectory": r.root})
	if err != nil {
		t.Fatal(err)
	}
	reg, err := storage.NewRegistry(ctx, d, storage.EnableDelete)
	if err != nil {
		t.Fatal(err)
	}
	if err := storage.MarkAndSweep(ctx, d, reg, storage.GCOpts{RemoveUntagged: true, Quiet: true}); err != nil {
		t.Fatalf("garbage collection: %v", err)
	}
	return before - r.blobCount(t)
}

// blobCount counts the blobs in the storage (docker/registry/v2/blobs).
func (r *distRegistry) blobCount(t *testing.T) int {
	t.Helper()
	n := 0
	err := filepath.Walk(filepath.Join(r.root, "docker", "registry", "v2", "blobs"), func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if fi.Mode().IsRegular() && fi.Name() == "data" {
			n++
		}
		return nil
	})
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return n
}

type codeWriter struct {
	http.ResponseWriter
	code int
	n    int64 // body bytes written
}

func (c *codeWriter) WriteHeader(code int) {
	if c.code == 0 {
		c.code = code
	}
	c.ResponseWriter.WriteHeader(code)
}

func (c *codeWriter) Write(b []byte) (int, error) {
	if c.code == 0 {
		c.code = http.StatusOK
	}
	n, err := c.ResponseWriter.Write(b)
	c.n += int64(n)
	return n, err
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
