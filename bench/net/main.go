// Command net benchmarks `csi-composefs pull` over real network links: it
// builds its own two-host network (two network namespaces and a veth pair,
// with addresses only they have), shapes the link's bandwidth with tbf
// (one token bucket every connection shares), adds the round trip with
// toxiproxy (a real TCP fault proxy, in front of the servers), serves the
// repository with nginx (HTTP/1.1, and HTTP/2 over TLS) in the server
// namespace and pulls in the client namespace. For each link profile it
// prints, side by side and from the same run, a cold pull against the
// single-stream baselines (curl of the same bytes as one file + fsync, and
// curl | tar xz of the tree), a warm pull of a second image sharing 90 %,
// the bytes on the wire, requests, peak RSS and CPU time. With the OCI
// source (-sources oci), distribution's registry (served by this binary,
// TLS, behind the same proxy) holds the tree as composefs artifacts and as
// a plain one-layer image: cold and warm pulls of the artifact and a cold
// pull of the image (converted on the node) are measured against curl of
// the same bytes + fsync and crane pull + untar of the image.
//
// Run by hand as root on Debian, from this directory:
//
//	go run . [-profiles lan,region,remote,far] [-trees mixed,small] [-sources http,oci] [-runs 1]
//
// Everything is removed on exit, Ctrl-C included (-work DIR keeps the
// generated trees and repository there for the next run).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A link profile: the bottleneck's rate and the round trip.
type profile struct {
	name  string
	rate  int64 // bits per second; 0: no link (the server namespace's loopback)
	rtt   time.Duration
	scale float64 // of the mixed tree: a smaller one where a full one takes minutes
}

var allProfiles = []profile{
	{"loopback", 0, 0, 1},
	{"lan", 10e9, 200 * time.Microsecond, 1},
	{"region", 2.5e9, 2 * time.Millisecond, 1},
	{"remote", 1e9, 20 * time.Millisecond, 1},
	{"far", 200e6, 80 * time.Millisecond, 0.25},
}

// A pull candidate: a binary and its extra flags.
type candidate struct {
	name, bin string
	args      []string
}

type options struct {
	profiles, trees, protos []string
	sources                 []string
	runs                    int
	work                    string
	keep, hold              bool
	diskGiB                 int
	floor                   bool
	cands                   []candidate
}

func main() {
	if len(os.Args) > 1 {
		if sub, ok := subcommands[os.Args[1]]; ok {
			if err := sub(os.Args[2:]); err != nil {
				fmt.Fprintln(os.Stderr, "bench/net "+os.Args[1]+":", err)
				os.Exit(1)
			}
			return
		}
	}
	var (
		o                       options
		profiles, trees, protos string
		sources                 string
		bin                     string
		pullArgs                string
		cands                   multiFlag
	)
	flag.StringVar(&profiles, "profiles", "loopback,lan,region,remote,far", "link profiles to run")
	flag.StringVar(&trees, "trees", "mixed,small", "trees: mixed (~10,000 files, 1 GiB), small (~6,000 of 256 B-256 KiB)")
	flag.StringVar(&protos, "protos", "h1,h2", "of the HTTP repository: h1: HTTP/1.1; h2: HTTP/2 over TLS")
	flag.StringVar(&sources, "sources", "http,oci", "http: the HTTP repository (nginx); oci: distribution's registry (TLS) with composefs artifacts and a plain image")
	flag.IntVar(&o.runs, "runs", 1, "rounds per cell (medians are printed); a full run of every profile, tree and source takes about 35 minutes a round here")
	flag.StringVar(&o.work, "work", "", "work directory kept between runs (trees and repository are reused)")
	flag.BoolVar(&o.keep, "keep", false, "keep the temporary directory")
	flag.IntVar(&o.diskGiB, "disk-gib", 8, "size of the benchmark's own ext4 (loop device) that every download is written to; 0: write into the work directory's filesystem instead")
	flag.BoolVar(&o.floor, "floor", true, "also measure cp -r of the tree + syncfs onto the same disk (no network: what writing the files durably costs)")
	flag.BoolVar(&o.hold, "hold", false, "set up the first profile, print how to reach it, and wait for Ctrl-C (to pull by hand)")
	flag.StringVar(&bin, "bin", "", "csi-composefs binary (default: built from this repository)")
	flag.StringVar(&pullArgs, "pull-args", "", "extra flags of the pull (space-separated)")
	flag.Var(&cands, "cand", "another pull candidate NAME=BINARY[ FLAGS…] (repeatable), measured interleaved with the first")
	flag.Parse()
	o.profiles, o.trees, o.protos, o.sources = split(profiles), split(trees), split(protos), split(sources)
	if !slices.Contains(o.sources, "http") {
		o.protos = nil
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	b, err := setup(ctx, o, bin, pullArgs, cands)
	if b != nil {
		defer b.cleanup()
	}
	if err == nil {
		err = b.runAll(ctx)
	}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("interrupted: %w", err)
		}
		fmt.Fprintln(os.Stderr, "bench/net:", err)
		if b != nil {
			b.cleanup()
		}
		os.Exit(1)
	}
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func split(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

type bench struct {
	o        options
	root     string // work directory
	temp     bool   // root is ours to remove
	www      string
	cliBin   string // the first candidate's binary (builds the repository)
	craneBin string
	net      *network
	ng       *nginx
	tp       toxiproxy
	toxi     *exec.Cmd
	ca, key  string
	reg      *registry        // nil: no OCI source
	disk     *disk            // where downloads are written (nil: under root)
	trees    map[string]*tree // by name (and scale)
	cleaned  bool
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, time.Now().Format("15:04:05 ")+format+"\n", args...)
}

func setup(ctx context.Context, o options, bin, pullArgs string, cands []string) (*bench, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("must run as root (network namespaces, tc)")
	}
	for _, t := range []string{"ip", "tc", "curl", "tar", "gzip", "/usr/bin/time"} {
		if _, err := exec.LookPath(t); err != nil {
			return nil, fmt.Errorf("%s is missing (apt-get install iproute2 curl tar gzip time)", t)
		}
	}
	if _, err := exec.LookPath("nginx"); err != nil {
		if _, err := os.Stat("/usr/sbin/nginx"); err != nil {
			logf("installing nginx-light…")
			if err := sh("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null && (service nginx stop || true) >/dev/null 2>&1"); err != nil {
				return nil, err
			}
		}
	}
	b := &bench{o: o, trees: map[string]*tree{}}
	if o.work != "" {
		b.root = o.work
		if err := os.MkdirAll(b.root, 0o755); err != nil {
			return b, err
		}
	} else {
		d, err := os.MkdirTemp("/var/tmp", "cfs-netbench.")
		if err != nil {
			return b, err
		}
		b.root, b.temp = d, !o.keep
	}
	if err := os.Chmod(b.root, 0o755); err != nil {
		return b, err
	}
	b.net = newNetwork(strconv.Itoa(os.Getpid() % 10000))
	here, _ := os.Getwd()
	binDir := filepath.Join(b.root, "bin")
	logf("building toxiproxy%s…", map[bool]string{true: "", false: " and csi-composefs"}[bin != ""])
	if err := sh("cd %s && go build -o %s github.com/Shopify/toxiproxy/v2/cmd/server", q(here), q(binDir+"/toxiproxy-server")); err != nil {
		return b, err
	}
	if bin == "" {
		bin = filepath.Join(binDir, "csi-composefs")
		if err := sh("cd %s/../.. && go build -o %s ./cmd/csi-composefs", q(here), q(bin)); err != nil {
			return b, err
		}
	}
	b.cliBin = bin
	if slices.Contains(o.sources, "oci") {
		b.craneBin = filepath.Join(binDir, "crane")
		logf("building crane…")
		if err := sh("cd %s && go build -o %s github.com/google/go-containerregistry/cmd/crane", q(here), q(b.craneBin)); err != nil {
			return b, err
		}
	}
	b.o.cands = append(b.o.cands, candidate{name: "pull", bin: bin, args: strings.Fields(pullArgs)})
	for _, c := range cands {
		name, rest, ok := strings.Cut(c, "=")
		f := strings.Fields(rest)
		if !ok || len(f) == 0 {
			return b, fmt.Errorf("-cand %q: want NAME=BINARY[ FLAGS…]", c)
		}
		b.o.cands = append(b.o.cands, candidate{name: name, bin: f[0], args: f[1:]})
	}

	b.www = filepath.Join(b.root, "www")
	for _, d := range []string{b.www + "/objects", b.www + "/images"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return b, err
		}
	}
	for _, p := range b.profiles() {
		for _, name := range o.trees {
			if ctx.Err() != nil {
				return b, ctx.Err()
			}
			if _, err := b.tree(name, p.scale); err != nil {
				return b, err
			}
		}
	}
	if err := sh("chmod -R a+rX %s", q(b.www)); err != nil {
		return b, err
	}

	if o.diskGiB > 0 {
		logf("a %d GiB ext4 on a loop device for the downloads…", o.diskGiB)
		d, err := newDisk(b.root, o.diskGiB)
		if err != nil {
			return b, err
		}
		b.disk = d
	}
	logf("network %s <-> %s", b.net.srv, b.net.cli)
	if err := b.net.up(); err != nil {
		return b, err
	}
	cert, key, err := writeCert(b.root, b.net.srvAddr, "127.0.0.1")
	if err != nil {
		return b, err
	}
	b.ca, b.key = cert, key
	b.ng = &nginx{dir: filepath.Join(b.root, "nginx"), www: b.www, cert: cert, key: key}
	if err := os.MkdirAll(b.ng.dir, 0o755); err != nil {
		return b, err
	}
	os.Remove(b.ng.accessLog())
	if err := b.ng.start(b.net.srv); err != nil {
		return b, err
	}
	b.tp = toxiproxy{ns: b.net.srv, api: toxiAPI}
	host, port, _ := strings.Cut(toxiAPI, ":")
	b.toxi = exec.Command("ip", "netns", "exec", b.net.srv, filepath.Join(binDir, "toxiproxy-server"), "-host", host, "-port", port)
	b.toxi.Env = append(os.Environ(), "LOG_LEVEL=error")
	if err := b.toxi.Start(); err != nil {
		return b, err
	}
	if err := b.tp.wait(); err != nil {
		return b, err
	}
	for _, p := range []struct {
		name     string
		from, to int
	}{{"http", proxyHTTP, nginxHTTP}, {"https", proxyHTTPS, nginxHTTPS}} {
		if err := b.tp.addProxy(p.name, fmt.Sprintf("%s:%d", b.net.srvAddr, p.from), fmt.Sprintf("127.0.0.1:%d", p.to)); err != nil {
			return b, err
		}
	}
	if b.oci() {
		logf("starting the registry…")
		if err := b.startRegistry(); err != nil {
			return b, err
		}
		if err := b.tp.addProxy("registry", fmt.Sprintf("%s:%d", b.net.srvAddr, proxyOCI), fmt.Sprintf("127.0.0.1:%d", registryPort)); err != nil {
			return b, err
		}
		for _, t := range b.trees {
			if ctx.Err() != nil {
				return b, ctx.Err()
			}
			if err := b.publishOCI(t); err != nil {
				return b, err
			}
		}
	}
	return b, nil
}

func (b *bench) oci() bool { return slices.Contains(b.o.sources, "oci") }

func (b *bench) profiles() []profile {
	var ps []profile
	for _, p := range allProfiles {
		if slices.Contains(b.o.profiles, p.name) {
			ps = append(ps, p)
		}
	}
	return ps
}

// tree returns the named tree at scale, generating and publishing it the
// first time.
func (b *bench) tree(name string, scale float64) (*tree, error) {
	key := name
	if scale != 1 && name == "mixed" {
		key = fmt.Sprintf("%s-%g", name, scale)
	} else {
		scale = 1
	}
	if t, ok := b.trees[key]; ok {
		return t, nil
	}
	t, ok := benchTrees(scale)[name]
	if !ok {
		return nil, fmt.Errorf("no tree %q (mixed, small)", name)
	}
	t.name = key
	logf("generating tree %s…", key)
	if err := t.generate(b.root); err != nil {
		return nil, err
	}
	logf("building the repository for %s…", key)
	if err := t.publish(b.cliBin, b.root, b.www); err != nil {
		return nil, err
	}
	b.trees[key] = t
	logf("tree %s: %d files, %.0f MiB", t.name, t.files, float64(t.bytes)/(1<<20))
	return t, nil
}

func (b *bench) cleanup() {
	if b.cleaned {
		return
	}
	b.cleaned = true
	if b.ng != nil {
		b.ng.stop()
	}
	b.reg.stop()
	if b.toxi != nil && b.toxi.Process != nil {
		_ = b.toxi.Process.Kill()
		_ = b.toxi.Wait()
	}
	if b.net != nil {
		b.net.down()
	}
	b.disk.remove()
	if b.temp {
		os.RemoveAll(b.root)
	} else if b.root != "" {
		os.RemoveAll(filepath.Join(b.root, "out"))
		logf("kept %s", b.root)
	}
}
