package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// sample is one measured command.
type sample struct {
	wall     time.Duration
	cpu      time.Duration // user + system of the command and its children
	rssKiB   int64         // peak RSS of the largest process
	wire     int64         // bytes the server side put on the link
	requests int64         // requests nginx served
}

// endpoint is where the client of a profile reaches the repository, and
// what it runs in.
type endpoint struct {
	ns, dev   string // namespace to run in; device (in the server namespace) whose tx is the wire
	base      string // repository URL
	h2        bool
	curlFlags []string
}

func (b *bench) endpoint(p profile, proto string) endpoint {
	e := endpoint{ns: b.net.cli, dev: b.net.srvDev}
	host := b.net.srvAddr
	httpPort, httpsPort := proxyHTTP, proxyHTTPS
	if p.rate == 0 {
		e.ns, e.dev, host = b.net.srv, "lo", "127.0.0.1"
		httpPort, httpsPort = nginxHTTP, nginxHTTPS
	}
	switch proto {
	case "h2":
		e.h2 = true
		e.base = fmt.Sprintf("https://%s:%d", host, httpsPort)
		e.curlFlags = []string{"--http2", "--cacert", b.ca}
	default:
		e.base = fmt.Sprintf("http://%s:%d", host, httpPort)
		e.curlFlags = []string{"--http1.1"}
	}
	return e
}

// measure runs script in e's namespace under GNU time (which forks the
// command itself, so that the peak RSS is the command's own).
func (b *bench) measure(ctx context.Context, e endpoint, script string) (sample, error) {
	tf := filepath.Join(b.root, "time.out")
	os.Remove(tf)
	wire0, err := txBytes(b.net.srv, e.dev)
	if err != nil {
		return sample{}, err
	}
	req0 := b.requests()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", e.ns, "/usr/bin/time", "-f", "%U %S %M", "-o", tf, "sh", "-c", script)
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	wall := time.Since(t0)
	if err != nil {
		return sample{}, fmt.Errorf("%s: %v: %s", script, err, lastLines(string(out), 5))
	}
	time.Sleep(50 * time.Millisecond) // the access log's last lines
	s := sample{wall: wall, requests: b.requests() - req0}
	if wire1, err := txBytes(b.net.srv, e.dev); err == nil {
		s.wire = wire1 - wire0
	}
	tb, err := os.ReadFile(tf)
	if err != nil {
		return s, err
	}
	f := strings.Fields(lastLines(string(tb), 1))
	if len(f) == 3 {
		u, _ := strconv.ParseFloat(f[0], 64)
		sy, _ := strconv.ParseFloat(f[1], 64)
		s.cpu = time.Duration((u + sy) * float64(time.Second))
		s.rssKiB, _ = strconv.ParseInt(f[2], 10, 64)
	}
	return s, nil
}

// requests are what the servers (nginx, the registry) have served so far.
func (b *bench) requests() int64 {
	n := b.ng.requests()
	if b.reg != nil {
		n += b.reg.log.count()
	}
	return n
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(len(l)-n, 0):], "\n")
}

// A cell's samples by what was measured ("curl", "tar", "CAND cold", "CAND warm").
type cell struct {
	p      profile
	t      *tree
	proto  string
	rtt    time.Duration
	s      map[string][]sample
	ratios map[string][]float64 // per-run ratios, paired within the run
}

func (b *bench) runAll(ctx context.Context) error {
	var cells []*cell
	logf("load average: %s", loadavg())
	for _, p := range b.profiles() {
		if err := b.net.shape(p.rate); err != nil {
			return err
		}
		proxies := []string{"http", "https"}
		if b.oci() {
			proxies = append(proxies, "registry")
		}
		for _, px := range proxies {
			if err := b.tp.setLatency(px, p.rtt); err != nil {
				return err
			}
		}
		if b.o.hold {
			for _, proto := range b.o.protos {
				e := b.endpoint(p, proto)
				fmt.Printf("%s %s: ip netns exec %s CMD; repository %s; CA %s; measured RTT %v\n", p.name, proto, e.ns, e.base, b.ca, b.rtt(e))
			}
			if b.oci() {
				fmt.Printf("%s oci: ip netns exec %s CMD; registry %s (oci://…/cfs/TREE:1, docker://…/plain/TREE:1); CA %s\n", p.name, b.endpoint(p, "h2").ns, b.registryHost(p), b.ca)
			}
			fmt.Printf("downloads go to %s\n", filepath.Join(b.root, "out"))
			fmt.Println("holding; Ctrl-C ends")
			<-ctx.Done()
			return nil
		}
		for _, tn := range b.o.trees {
			t, err := b.tree(tn, p.scale)
			if err != nil {
				return err
			}
			// Everything served from the page cache.
			_ = sh("cat %s %s >/dev/null; find %s -type f -print0 | xargs -0 cat >/dev/null",
				q(b.www+"/"+t.blob), q(b.www+"/"+t.tarball), q(b.www+"/images"))
			_ = sh("find %s -type f -print0 | xargs -0 cat >/dev/null", q(b.www+"/objects"))
			if b.reg != nil {
				_ = sh("find %s -type f -print0 | xargs -0 cat >/dev/null", q(b.reg.dir+"/storage"))
			}
			var cs []*cell
			protos := slices.Clone(b.o.protos)
			if b.oci() {
				protos = append(protos, "oci")
			}
			for _, proto := range protos {
				c := &cell{p: p, t: t, proto: proto, s: map[string][]sample{}, ratios: map[string][]float64{}}
				if proto == "oci" {
					c.rtt = b.rtt(b.endpoint(p, "h2")) // the same proxy, the same link
				} else {
					c.rtt = b.rtt(b.endpoint(p, proto))
				}
				cs = append(cs, c)
			}
			for r := range b.o.runs {
				for i := range cs {
					c := cs[(i+r)%len(cs)]
					logf("%s %s %s round %d/%d (load %s)", p.name, t.name, c.proto, r+1, b.o.runs, loadavg())
					if err := b.round(ctx, c, r); err != nil {
						return err
					}
				}
			}
			for _, c := range cs {
				c.print(b)
			}
			cells = append(cells, cs...)
		}
	}
	logf("load average: %s", loadavg())
	b.summary(cells)
	return nil
}

// rtt is the time to first byte of a request on a connection already open.
func (b *bench) rtt(e endpoint) time.Duration {
	u := e.base + "/images/"
	args := append([]string{"netns", "exec", e.ns, "curl", "-s", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{time_starttransfer} %{time_pretransfer}\n"}, e.curlFlags...)
	var best time.Duration
	for range 5 {
		out, err := exec.Command("ip", append(args, u, u)...).Output()
		if err != nil {
			return 0
		}
		l := strings.Split(strings.TrimSpace(string(out)), "\n")
		f := strings.Fields(l[len(l)-1])
		if len(f) != 2 {
			return 0
		}
		st, _ := strconv.ParseFloat(f[0], 64)
		pt, _ := strconv.ParseFloat(f[1], 64)
		d := time.Duration((st - pt) * float64(time.Second))
		if best == 0 || d < best {
			best = d
		}
	}
	return best
}

// runTurned runs steps starting at step r (mod their number), so that
// each round begins with another, then syncs what they wrote.
func runTurned(steps []func() error, r int) error {
	for i := range steps {
		if err := steps[(i+r)%len(steps)](); err != nil {
			return err
		}
	}
	_ = sh("sync")
	return nil
}

// last is the latest sample of k.
func (c *cell) last(k string) sample { l := c.s[k]; return l[len(l)-1] }

// round measures once every baseline and candidate of c, in an order that
// turns with the round.
func (b *bench) round(ctx context.Context, c *cell, r int) error {
	if c.proto == "oci" {
		return b.ociRound(ctx, c, r)
	}
	e := b.endpoint(c.p, c.proto)
	out := filepath.Join(b.root, "out", fmt.Sprintf("%s-%s-%s-%d", c.p.name, c.t.name, c.proto, r))
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(out)
	curl := "curl -sf " + strings.Join(e.curlFlags, " ")
	steps := []func() error{
		b.curlStep(ctx, c, e, out),
		func() error {
			d := filepath.Join(out, "tar")
			if err := os.MkdirAll(d, 0o755); err != nil {
				return err
			}
			s, err := b.measure(ctx, e, fmt.Sprintf("%s %s | tar -xzf - -C %s", curl, q(e.base+"/"+c.t.tarball), q(d)))
			c.s["tar"] = append(c.s["tar"], s)
			return err
		},
	}
	if b.o.floor {
		steps = append(steps, b.cpStep(ctx, c, e, out))
	}
	for i, cand := range b.o.cands {
		steps = append(steps, func() error {
			store := filepath.Join(out, fmt.Sprintf("store-%d", i))
			args := []string{q(cand.bin), "pull", "--store-dir", q(store), "--repository", q(e.base), "--progress", "none"}
			if e.h2 {
				args = append(args, "--ca-file", q(b.ca))
			}
			for _, a := range cand.args {
				args = append(args, q(a))
			}
			pull := strings.Join(args, " ")
			s, err := b.measure(ctx, e, pull+" "+q(c.t.image1)+" >/dev/null")
			c.s[cand.name+" cold"] = append(c.s[cand.name+" cold"], s)
			if err != nil {
				return err
			}
			s, err = b.measure(ctx, e, pull+" "+q(c.t.image2)+" >/dev/null")
			c.s[cand.name+" warm"] = append(c.s[cand.name+" warm"], s)
			return err
		})
	}
	if err := runTurned(steps, r); err != nil {
		return err
	}
	last := c.last
	for _, cand := range b.o.cands {
		cold := last(cand.name + " cold")
		c.ratios[cand.name+" ÷curl"] = append(c.ratios[cand.name+" ÷curl"], cold.wall.Seconds()/last("curl").wall.Seconds())
		c.ratios[cand.name+" ÷tar"] = append(c.ratios[cand.name+" ÷tar"], cold.wall.Seconds()/last("tar").wall.Seconds())
		if b.o.floor {
			c.ratios[cand.name+" ÷cp"] = append(c.ratios[cand.name+" ÷cp"], cold.wall.Seconds()/last("cp").wall.Seconds())
		}
		warm := last(cand.name + " warm")
		c.ratios[cand.name+" warm"] = append(c.ratios[cand.name+" warm"], float64(warm.wire)/float64(c.t.newBytes+c.t.image2Bytes))
	}
	return nil
}

// curlStep measures the single-stream baseline: curl of the tree's bytes
// as one file, then fsync.
func (b *bench) curlStep(ctx context.Context, c *cell, e endpoint, out string) func() error {
	return func() error {
		f := filepath.Join(out, "blob")
		s, err := b.measure(ctx, e, fmt.Sprintf("curl -sf %s -o %s %s && sync %s", strings.Join(e.curlFlags, " "), q(f), q(e.base+"/"+c.t.blob), q(f)))
		c.s["curl"] = append(c.s["curl"], s)
		return err
	}
}

// cpStep measures the floor with no network: the tree's files written and
// made durable on the same disk (one syncfs), what any store of one file
// per object pays at least.
func (b *bench) cpStep(ctx context.Context, c *cell, e endpoint, out string) func() error {
	return func() error {
		d := filepath.Join(out, "cp")
		s, err := b.measure(ctx, e, fmt.Sprintf("cp -r %s %s && sync -f %s", q(c.t.dir), q(d), q(d)))
		c.s["cp"] = append(c.s["cp"], s)
		return err
	}
}

func median[T int64 | float64 | time.Duration](v []T) T {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func field[T any](ss []sample, f func(sample) T) []T {
	out := make([]T, len(ss))
	for i, s := range ss {
		out[i] = f(s)
	}
	return out
}

func (p profile) describe() string {
	if p.rate == 0 {
		return "loopback (no link: nginx on the server namespace's loopback, no proxy)"
	}
	return fmt.Sprintf("%s: %s, %v RTT", p.name, rate(p.rate), p.rtt)
}

func rate(bits int64) string {
	if bits >= 1e9 {
		return fmt.Sprintf("%g Gbit/s", float64(bits)/1e9)
	}
	return fmt.Sprintf("%g Mbit/s", float64(bits)/1e6)
}

func (c *cell) print(b *bench) {
	fmt.Printf("\n== %s | tree %s: %d files, %.0f MiB | %s | measured RTT %.2f ms | %d rounds, medians\n",
		c.p.describe(), c.t.name, c.t.files, float64(c.t.bytes)/(1<<20), c.proto, float64(c.rtt)/1e6, b.o.runs)
	fmt.Printf("%-22s %8s %8s %8s %8s %9s %12s\n", "", "time s", "MiB/s", "CPU s", "RSS MiB", "requests", "wire÷needed")
	keys, names := c.keys(b)
	for _, k := range keys {
		ss := c.s[k]
		needed := c.needed(b, k)
		wall := median(field(ss, func(s sample) time.Duration { return s.wall }))
		name := names[k]
		if name == "" {
			name = k
		}
		fmt.Printf("%-22s %8.2f %8.0f %8.2f %8.0f %9d %12.3f\n", name, wall.Seconds(),
			float64(needed)/(1<<20)/wall.Seconds(),
			median(field(ss, func(s sample) time.Duration { return s.cpu })).Seconds(),
			float64(median(field(ss, func(s sample) int64 { return s.rssKiB })))/1024,
			median(field(ss, func(s sample) int64 { return s.requests })),
			float64(median(field(ss, func(s sample) int64 { return s.wire })))/float64(needed))
	}
	if c.proto == "oci" {
		c.printOCI(b)
		return
	}
	for _, cand := range b.o.cands {
		if b.o.floor {
			fmt.Printf("%s: cold ÷ cp -r+syncfs (no network) %.2f\n", cand.name, median(c.ratios[cand.name+" ÷cp"]))
		}
		fmt.Printf("%s: cold ÷ curl+fsync %.2f (goal ≤ %s), cold ÷ curl|tar %.2f (≤ 0.5), warm wire ÷ (new + image) %.3f (≤ 1.05)\n",
			cand.name, median(c.ratios[cand.name+" ÷curl"]), c.p.curlGoal(), median(c.ratios[cand.name+" ÷tar"]), median(c.ratios[cand.name+" warm"]))
	}
}

// keys are what c measured, in print order, and their printed names.
func (c *cell) keys(b *bench) ([]string, map[string]string) {
	if c.proto == "oci" {
		return c.ociKeys(b)
	}
	keys := []string{"curl", "tar"}
	if b.o.floor {
		keys = append(keys, "cp")
	}
	for _, cand := range b.o.cands {
		keys = append(keys, cand.name+" cold", cand.name+" warm")
	}
	return keys, map[string]string{"curl": "curl+fsync", "tar": "curl|tar xz", "cp": "cp -r+syncfs"}
}

// needed are the bytes the command measured as k has to receive.
func (c *cell) needed(b *bench, k string) int64 {
	switch {
	case strings.HasSuffix(k, " warm"):
		n := c.t.newBytes + c.t.image2Bytes
		if c.proto == "oci" {
			n += c.t.oci.index2Bytes
		}
		return n
	case k == "tar" || k == "crane" || strings.HasSuffix(k, " docker cold"):
		if fi, err := os.Stat(filepath.Join(b.www, c.t.tarball)); err == nil {
			return fi.Size()
		}
	}
	return c.t.bytes
}

func (p profile) curlGoal() string {
	if p.rate == 0 || p.name == "lan" {
		return "1.5"
	}
	return "1.25"
}

// subjects are the pulls of c whose ratios are kept under NAME ÷curl,
// NAME ÷tar (÷ crane pull+untar for OCI), NAME ÷cp, NAME warm.
func (c *cell) subjects(b *bench) []string {
	var out []string
	for _, cand := range b.o.cands {
		if c.proto == "oci" {
			out = append(out, cand.name+" oci", cand.name+" docker")
		} else {
			out = append(out, cand.name)
		}
	}
	return out
}

func (b *bench) summary(cells []*cell) {
	fmt.Printf("\n== summary (medians of per-round ratios; each round runs baselines and pulls back to back)\n")
	fmt.Printf("oci: composefs artifact (oci://); docker: the plain image converted on the node (docker://); their ÷tar is ÷ crane pull+untar\n")
	fmt.Printf("%-9s %-14s %-5s %-13s %10s %9s %9s %10s %9s %8s %8s\n", "profile", "tree", "proto", "cand", "÷curl+fs", "÷tar", "÷cp", "warm wire", "cold s", "RSS MiB", "CPU s")
	for _, c := range cells {
		for _, name := range c.subjects(b) {
			ss := c.s[name+" cold"]
			warm := "-"
			if w := c.ratios[name+" warm"]; len(w) > 0 {
				warm = fmt.Sprintf("%.3f", median(w))
			}
			fmt.Printf("%-9s %-14s %-5s %-13s %5.2f/%-4s %9.2f %9.2f %10s %9.2f %8.0f %8.2f\n", c.p.name, c.t.name, c.proto, name,
				median(c.ratios[name+" ÷curl"]), c.p.curlGoal(), median(c.ratios[name+" ÷tar"]), median(c.ratios[name+" ÷cp"]), warm,
				median(field(ss, func(s sample) time.Duration { return s.wall })).Seconds(),
				float64(median(field(ss, func(s sample) int64 { return s.rssKiB })))/1024,
				median(field(ss, func(s sample) time.Duration { return s.cpu })).Seconds())
		}
	}
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}
