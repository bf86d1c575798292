package suite

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/time/rate"
)

// repoServer is the static HTTP repository of the suite: a folder served
// on an address the node reaches, counting requests per path and able to
// throttle object downloads.
type repoServer struct {
	dir    string // served root
	url    string // base URL as the node sees it
	prefix string // path the driver's allow-list admits, e.g. /e2e/

	mu      sync.Mutex
	counts  map[string]int
	limiter *rate.Limiter // shared by all object downloads while set
}

func startRepo(addr, url, prefix string) (*repoServer, error) {
	dir, err := os.MkdirTemp("", "csi-composefs-e2e-repo-")
	if err != nil {
		return nil, err
	}
	if !strings.HasPrefix(prefix, "/") || !strings.HasSuffix(prefix, "/") {
		return nil, fmt.Errorf("E2E_REPO_PREFIX %q: want /path/", prefix)
	}
	r := &repoServer{dir: dir, url: strings.TrimSuffix(url, "/"), prefix: prefix, counts: map[string]int{}}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("repository listener: %w", err)
	}
	files := http.FileServer(http.Dir(dir))
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		r.counts[req.URL.Path]++
		lim := r.limiter
		r.mu.Unlock()
		if lim != nil && strings.Contains(req.URL.Path, "/objects/") {
			w = &throttled{ResponseWriter: w, lim: lim, ctx: req.Context()}
		}
		files.ServeHTTP(w, req)
	})}
	go srv.Serve(l) //nolint:errcheck
	return r, nil
}

// throttled writes through a shared rate limiter, in small pieces.
type throttled struct {
	http.ResponseWriter
	lim *rate.Limiter
	ctx context.Context
}

func (t *throttled) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		chunk := min(len(p), 4096)
		if err := t.lim.WaitN(t.ctx, chunk); err != nil {
			return n, err
		}
		w, err := t.ResponseWriter.Write(p[:chunk])
		n += w
		if err != nil {
			return n, err
		}
		if f, ok := t.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		p = p[chunk:]
	}
	return n, nil
}

// throttle limits all object downloads together to bytesPerSec (0: off).
func (r *repoServer) throttle(bytesPerSec int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if bytesPerSec <= 0 {
		r.limiter = nil
		return
	}
	r.limiter = rate.NewLimiter(rate.Limit(bytesPerSec), 4096)
}

// repo is one repository folder of the server.
type repo struct {
	srv  *repoServer
	dir  string
	url  string // base URL for the volume's repository attribute
	path string // URL path, for counting
}

// newRepo makes a fresh repository inside the allow-list (allowed) or
// outside it.
func (r *repoServer) newRepo(t *testing.T, allowed bool) *repo {
	t.Helper()
	base := r.prefix
	if !allowed {
		base = "/outside/"
	}
	name := fmt.Sprintf("%s-%d", strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name())), time.Now().UnixNano())
	p := base + name
	dir := filepath.Join(r.dir, filepath.FromSlash(p))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return &repo{srv: r, dir: dir, url: r.url + p, path: p}
}

// requests counts the GETs of paths under the repository matching sub
// (e.g. "/objects/"), and the most any one path had.
func (p *repo) requests(sub string) (total, maxPerPath, paths int) {
	p.srv.mu.Lock()
	defer p.srv.mu.Unlock()
	for k, n := range p.srv.counts {
		if strings.HasPrefix(k, p.path+"/") && strings.Contains(k[len(p.path):], sub) {
			total += n
			paths++
			maxPerPath = max(maxPerPath, n)
		}
	}
	return
}

// objectFiles lists the repository's object files (relative to objects/).
func (p *repo) objectFiles(t *testing.T) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	root := filepath.Join(p.dir, "objects")
	filepath.Walk(root, func(path string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			rel, _ := filepath.Rel(root, path)
			out[filepath.ToSlash(rel)] = fi.Size()
		}
		return nil
	})
	return out
}

// build publishes the tree src as image name with the project's CLI and
// returns its digest. Without packs: the cases count each object's own
// requests (objects/), which packs would replace with ranges of packs/.
func (p *repo) build(t *testing.T, e *env, name, src string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(e.cli, "image", "build", "--packs=false", "--repo", p.dir, "--name", name, src)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("csi-composefs image build --repo %s --name %s: %v\n%s", p.dir, name, err, stderr.String())
	}
	f := strings.Fields(stdout.String())
	if len(f) == 0 || len(f[len(f)-1]) != 64 {
		t.Fatalf("image build printed %q, want a digest", stdout.String())
	}
	return f[len(f)-1]
}

// tree is a source tree written for an image, with what a reader must see.
type tree struct {
	dir   string
	files map[string][]byte // relative path → content
	links map[string]string // relative path → symlink target
}

func newTree(t *testing.T) *tree {
	return &tree{dir: t.TempDir(), files: map[string][]byte{}, links: map[string]string{}}
}

func (tr *tree) add(t *testing.T, rel string, data []byte) {
	t.Helper()
	full := filepath.Join(tr.dir, rel)
	if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(full, data, 0o644); err != nil {
		t.Fatal(err)
	}
	tr.files[rel] = data
}

func (tr *tree) link(t *testing.T, rel, target string) {
	t.Helper()
	full := filepath.Join(tr.dir, rel)
	if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, full); err != nil {
		t.Fatal(err)
	}
	tr.links[rel] = target
}

func (tr *tree) bytes() (n int64) {
	for _, d := range tr.files {
		n += int64(len(d))
	}
	return n
}

// randomBytes is n bytes from a generator seeded by seed (equal seeds,
// equal bytes: shared files across images).
func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), byte(seed >> 24), byte(seed >> 32), 1}))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

var _ = io.EOF
