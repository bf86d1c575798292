package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/sirupsen/logrus"

	// The filesystem storage driver registers itself.
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
)

// Ports of the registry in the server namespace: distribution on its
// loopback (TLS, so HTTP/2 by ALPN as Go serves it), the fault proxy on
// the link's address in front of it.
const (
	registryPort = 5000
	proxyOCI     = 5443
)

// subcommands of this binary, run inside the server namespace (ip netns
// exec of os.Executable): the registry itself and the plain image's push.
var subcommands = map[string]func(args []string) error{
	"registry":   serveRegistry,
	"push-image": pushPlainImage,
}

// serveRegistry serves distribution's registry (filesystem storage, no
// auth) over TLS, one line per request appended to -log (the request
// count, as nginx's access log).
func serveRegistry(args []string) error {
	fs := flag.NewFlagSet("registry", flag.ExitOnError)
	addr := fs.String("addr", fmt.Sprintf("127.0.0.1:%d", registryPort), "listen address")
	root := fs.String("root", "", "storage directory")
	cert := fs.String("cert", "", "TLS certificate")
	key := fs.String("key", "", "TLS key")
	logFile := fs.String("log", "", "request log")
	if err := fs.Parse(args); err != nil {
		return err
	}
	logrus.SetOutput(io.Discard)
	logrus.SetLevel(logrus.ErrorLevel)
	cfg := &configuration.Configuration{
		Storage: configuration.Storage{
			"filesystem":  configuration.Parameters{"rootdirectory": *root},
			"maintenance": configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}},
		},
	}
	cfg.HTTP.Secret = "bench-upload-secret"
	app := handlers.NewApp(context.Background(), cfg)
	lf, err := os.OpenFile(*logFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	var mu sync.Mutex
	srv := &http.Server{Addr: *addr, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		app.ServeHTTP(w, r)
		mu.Lock()
		fmt.Fprintf(lf, "%s %s %s\n", r.Proto, r.Method, r.URL.Path)
		mu.Unlock()
	})}
	return srv.ListenAndServeTLS(*cert, *key)
}

// pushPlainImage pushes a plain OCI image of one layer, the given tar.gz
// as it is (as crane append -f does), for linux on this architecture.
// Prints the layer's digest.
func pushPlainImage(args []string) error {
	fs := flag.NewFlagSet("push-image", flag.ExitOnError)
	layerFile := fs.String("layer", "", "the layer (tar.gz)")
	ref := fs.String("ref", "", "REGISTRY/REPO:TAG")
	ca := fs.String("ca", "", "the registry's CA")
	if err := fs.Parse(args); err != nil {
		return err
	}
	layer, err := tarball.LayerFromFile(*layerFile)
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	r, err := name.ParseReference(*ref)
	if err != nil {
		return err
	}
	pem, err := os.ReadFile(*ca)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	if err := remote.Write(r, img, remote.WithTransport(tr)); err != nil {
		return err
	}
	d, err := layer.Digest()
	if err != nil {
		return err
	}
	fmt.Println(d)
	return nil
}

// registry is the running registry as the benchmark sees it.
type registry struct {
	dir string // storage, request log
	cmd *exec.Cmd
	log logCounter
}

func (b *bench) startRegistry() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	r := &registry{dir: filepath.Join(b.root, "registry")}
	if err := os.MkdirAll(r.dir, 0o755); err != nil {
		return err
	}
	r.log.path = filepath.Join(r.dir, "requests.log")
	os.Remove(r.log.path)
	r.cmd = exec.Command("ip", "netns", "exec", b.net.srv, self, "registry",
		"-root", filepath.Join(r.dir, "storage"), "-cert", b.ca, "-key", b.key, "-log", r.log.path)
	r.cmd.Stderr = os.Stderr
	if err := r.cmd.Start(); err != nil {
		return err
	}
	b.reg = r
	for range 100 {
		if exec.Command("ip", "netns", "exec", b.net.srv, "curl", "-sf", "-o", "/dev/null", "--cacert", b.ca,
			fmt.Sprintf("https://127.0.0.1:%d/v2/", registryPort)).Run() == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("the registry did not start")
}

func (r *registry) stop() {
	if r != nil && r.cmd != nil && r.cmd.Process != nil {
		_ = r.cmd.Process.Kill()
		_ = r.cmd.Wait()
	}
}

// The tree's OCI forms in the registry: both versions as composefs
// artifacts (cfs/NAME:1, cfs/NAME:2 pushed with --base :1, so that it
// reuses its packs) and the first as a plain image of one tar.gz layer
// (plain/NAME:1).
type ociTree struct {
	artifact1, artifact2, plain string // repository:tag
	layer                       string // the plain image's layer digest
	index2Bytes                 int64  // the second artifact's object index
}

// publishOCI pushes t's OCI forms from the server namespace, once per
// registry storage (a marker holds what later runs need).
func (b *bench) publishOCI(t *tree) error {
	o := &ociTree{artifact1: "cfs/" + t.name + ":1", artifact2: "cfs/" + t.name + ":2", plain: "plain/" + t.name + ":1"}
	marker := filepath.Join(b.reg.dir, t.name+".done")
	if m, err := os.ReadFile(marker); err == nil {
		f := strings.Fields(string(m))
		if len(f) == 2 {
			o.layer = f[0]
			o.index2Bytes, _ = strconv.ParseInt(f[1], 10, 64)
			t.oci = o
			return nil
		}
	}
	host := fmt.Sprintf("127.0.0.1:%d", registryPort)
	ns := "ip netns exec " + q(b.net.srv) + " "
	logf("pushing %s as composefs artifacts and a plain image…", t.name)
	push := ns + q(b.cliBin) + " image push -q --ca-file " + q(b.ca) + " --objects " + q(b.www+"/objects")
	if err := sh("%s %s %s >/dev/null", push, q(b.www+"/images/"+t.image1), q("oci://"+host+"/"+o.artifact1)); err != nil {
		return err
	}
	if err := sh("%s --base %s %s %s >/dev/null", push, q("oci://"+host+"/"+o.artifact1), q(b.www+"/images/"+t.image2), q("oci://"+host+"/"+o.artifact2)); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	out, err := exec.Command("ip", "netns", "exec", b.net.srv, self, "push-image",
		"-layer", filepath.Join(b.www, t.tarball), "-ref", host+"/"+o.plain, "-ca", b.ca).Output()
	if err != nil {
		return fmt.Errorf("pushing the plain image of %s: %w", t.name, err)
	}
	o.layer = strings.TrimSpace(string(out))
	// The second artifact's object index (what a warm pull needs besides
	// the new objects and the image).
	repo, tag, _ := strings.Cut(o.artifact2, ":")
	m, err := exec.Command("ip", "netns", "exec", b.net.srv, "curl", "-sf", "--cacert", b.ca,
		"-H", "Accept: application/vnd.oci.image.manifest.v1+json",
		fmt.Sprintf("https://%s/v2/%s/manifests/%s", host, repo, tag)).Output()
	if err != nil {
		return fmt.Errorf("manifest of %s: %w", o.artifact2, err)
	}
	var man struct {
		Layers []struct {
			MediaType string `json:"mediaType"`
			Size      int64  `json:"size"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(m, &man); err != nil {
		return fmt.Errorf("manifest of %s: %w", o.artifact2, err)
	}
	for _, l := range man.Layers {
		if strings.Contains(l.MediaType, "object-index") {
			o.index2Bytes = l.Size
		}
	}
	if o.index2Bytes == 0 {
		return fmt.Errorf("manifest of %s has no object index (an image index of shards?): %s", o.artifact2, m)
	}
	t.oci = o
	return os.WriteFile(marker, []byte(fmt.Sprintf("%s %d\n", o.layer, o.index2Bytes)), 0o644)
}

// logCounter counts a log's lines (requests served so far), reading on
// from where it stopped.
type logCounter struct {
	path       string
	off, lines int64
}

func (l *logCounter) count() int64 {
	f, err := os.Open(l.path)
	if err != nil {
		return l.lines
	}
	defer f.Close()
	if _, err := f.Seek(l.off, 0); err != nil {
		return l.lines
	}
	buf := make([]byte, 1<<20)
	for {
		m, err := f.Read(buf)
		l.lines += int64(strings.Count(string(buf[:m]), "\n"))
		l.off += int64(m)
		if err != nil {
			return l.lines
		}
	}
}
