package main

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// The benchmark's own two-host network: two network namespaces joined by a
// veth pair, with addresses only these namespaces have and no route out.
// The server side's egress (what the pull receives) is shaped by tbf; the
// client side's egress (requests) too, at the same rate.
type network struct {
	srv, cli         string // namespace names
	srvDev, cliDev   string // veth ends
	srvAddr, cliAddr string // addresses (a /30 of the namespaces alone)
}

func newNetwork(tag string) *network {
	return &network{
		srv: "cfsnet-" + tag + "-srv", cli: "cfsnet-" + tag + "-cli",
		srvDev: "vsrv" + tag, cliDev: "vcli" + tag,
		srvAddr: "10.213.13.1", cliAddr: "10.213.13.2",
	}
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func output(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return string(out), nil
}

// up creates the namespaces and the link. Nothing is added to the
// machine's own namespace: the veth pair is created inside the server
// namespace and one end moved to the client's.
func (n *network) up() error {
	steps := [][]string{
		{"ip", "netns", "add", n.srv},
		{"ip", "netns", "add", n.cli},
		{"ip", "-n", n.srv, "link", "add", n.srvDev, "type", "veth", "peer", "name", n.cliDev},
		{"ip", "-n", n.srv, "link", "set", n.cliDev, "netns", n.cli},
		{"ip", "-n", n.srv, "addr", "add", n.srvAddr + "/30", "dev", n.srvDev},
		{"ip", "-n", n.cli, "addr", "add", n.cliAddr + "/30", "dev", n.cliDev},
		{"ip", "-n", n.srv, "link", "set", "lo", "up"},
		{"ip", "-n", n.cli, "link", "set", "lo", "up"},
		{"ip", "-n", n.srv, "link", "set", n.srvDev, "up"},
		{"ip", "-n", n.cli, "link", "set", n.cliDev, "up"},
	}
	for _, s := range steps {
		if err := run(s[0], s[1:]...); err != nil {
			return err
		}
	}
	return nil
}

// down removes both namespaces (and so the veth pair and everything
// listening in them).
func (n *network) down() {
	for _, ns := range []string{n.cli, n.srv} {
		if out, err := exec.Command("ip", "netns", "pids", ns).Output(); err == nil {
			for _, pid := range strings.Fields(string(out)) {
				_ = exec.Command("kill", "-KILL", pid).Run()
			}
		}
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
}

// shape sets both directions' rate with tbf: a token bucket every
// connection shares, as a real link. The bucket holds 1 ms at the rate
// (at least 64 KiB, so that a GSO packet fits); the queue 10 ms (at least
// 256 KiB), beyond which packets are dropped, as a router's buffer.
func (n *network) shape(rateBits int64) error {
	for _, side := range [][2]string{{n.srv, n.srvDev}, {n.cli, n.cliDev}} {
		_ = exec.Command("ip", "-n", side[0], "link", "set", side[1], "qlen", "10000").Run()
		_ = exec.Command("tc", "-n", side[0], "qdisc", "del", "dev", side[1], "root").Run()
		if rateBits <= 0 {
			continue
		}
		burst := max(rateBits/8/1000, 64<<10)
		limit := max(rateBits/8/100, 256<<10)
		if err := run("tc", "-n", side[0], "qdisc", "add", "dev", side[1], "root", "tbf",
			"rate", fmt.Sprintf("%dbit", rateBits), "burst", fmt.Sprint(burst), "limit", fmt.Sprint(limit)); err != nil {
			return err
		}
	}
	return nil
}

// txBytes is what dev in ns has sent (bytes on the wire, headers included).
func txBytes(ns, dev string) (int64, error) {
	out, err := exec.Command("ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev).Output()
	if err != nil {
		return 0, fmt.Errorf("link stats of %s in %s: %w", dev, ns, err)
	}
	var links []struct {
		Stats64 struct {
			TX struct {
				Bytes int64 `json:"bytes"`
			} `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
		return 0, fmt.Errorf("link stats of %s in %s: %q", dev, ns, out)
	}
	return links[0].Stats64.TX.Bytes, nil
}

// toxiproxy drives the fault proxy in the server namespace through its
// API (on the namespace's loopback).
type toxiproxy struct {
	ns, api string
}

func (t toxiproxy) call(method, path, body string) error {
	args := []string{"netns", "exec", t.ns, "curl", "-sf", "-X", method, "http://" + t.api + path}
	if body != "" {
		args = append(args, "-H", "Content-Type: application/json", "-d", body)
	}
	return run("ip", args...)
}

func (t toxiproxy) wait() error {
	for range 100 {
		if t.call("GET", "/version", "") == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("toxiproxy API on %s did not answer", t.api)
}

func (t toxiproxy) addProxy(name, listen, upstream string) error {
	return t.call("POST", "/proxies", fmt.Sprintf(`{"name":%q,"listen":%q,"upstream":%q,"enabled":true}`, name, listen, upstream))
}

// setLatency replaces the proxy's latency toxics: half the round trip
// each way (toxiproxy counts whole milliseconds; 0 = no toxic).
func (t toxiproxy) setLatency(proxy string, rtt time.Duration) error {
	for _, dir := range []string{"up", "down"} {
		_ = t.call("DELETE", "/proxies/"+proxy+"/toxics/latency_"+dir, "")
	}
	half := rtt.Milliseconds() / 2
	if half == 0 {
		return nil
	}
	for _, dir := range []string{"up", "down"} {
		if err := t.call("POST", "/proxies/"+proxy+"/toxics", fmt.Sprintf(
			`{"name":"latency_%s","type":"latency","stream":"%sstream","toxicity":1,"attributes":{"latency":%d,"jitter":0}}`,
			dir, dir, half)); err != nil {
			return err
		}
	}
	return nil
}
