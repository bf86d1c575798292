package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// registryHost is where the client of p reaches the registry: through the
// fault proxy on the link, or on the server namespace's loopback.
func (b *bench) registryHost(p profile) string {
	if p.rate == 0 {
		return fmt.Sprintf("127.0.0.1:%d", registryPort)
	}
	return fmt.Sprintf("%s:%d", b.net.srvAddr, proxyOCI)
}

// ociRound measures once, in an order that turns with the round: the
// single-stream baseline (curl of the tree's bytes as one file from nginx
// over HTTP/2, through the same link) + fsync, cp -r + syncfs (no
// network), crane pull of the plain image + untar of its layer, and per
// candidate a cold pull of the composefs artifact, the second artifact
// warm into the same store, and a cold pull of the plain image (converted
// on the node) into another empty store.
func (b *bench) ociRound(ctx context.Context, c *cell, r int) error {
	e := b.endpoint(c.p, "h2")
	host := b.registryHost(c.p)
	o := c.t.oci
	out := filepath.Join(b.root, "out", fmt.Sprintf("%s-%s-oci-%d", c.p.name, c.t.name, r))
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(out)
	steps := []func() error{
		b.curlStep(ctx, c, e, out),
		func() error {
			// crane pull writes the image as an OCI layout (the layer blob
			// as it came); tar then extracts the layer. Neither syncs.
			d := filepath.Join(out, "crane")
			layer := filepath.Join(d, "layout", "blobs", strings.Replace(o.layer, ":", "/", 1))
			s, err := b.measure(ctx, e, fmt.Sprintf("SSL_CERT_FILE=%s %s pull --format=oci %s %s && mkdir %s && tar -xzf %s -C %s",
				q(b.ca), q(b.craneBin), q(host+"/"+o.plain), q(d+"/layout"), q(d+"/tree"), q(layer), q(d+"/tree")))
			c.s["crane"] = append(c.s["crane"], s)
			return err
		},
	}
	if b.o.floor {
		steps = append(steps, b.cpStep(ctx, c, e, out))
	}
	for i, cand := range b.o.cands {
		pull := func(store string) string {
			args := []string{q(cand.bin), "pull", "--store-dir", q(filepath.Join(out, store)), "--ca-file", q(b.ca), "--progress", "none"}
			for _, a := range cand.args {
				args = append(args, q(a))
			}
			return strings.Join(args, " ")
		}
		steps = append(steps, func() error {
			k := cand.name + " oci"
			store := fmt.Sprintf("store-oci-%d", i)
			s, err := b.measure(ctx, e, pull(store)+" "+q("oci://"+host+"/"+o.artifact1)+" >/dev/null")
			c.s[k+" cold"] = append(c.s[k+" cold"], s)
			if err != nil {
				return err
			}
			s, err = b.measure(ctx, e, pull(store)+" "+q("oci://"+host+"/"+o.artifact2)+" >/dev/null")
			c.s[k+" warm"] = append(c.s[k+" warm"], s)
			return err
		}, func() error {
			k := cand.name + " docker"
			s, err := b.measure(ctx, e, pull(fmt.Sprintf("store-docker-%d", i))+" "+q("docker://"+host+"/"+o.plain)+" >/dev/null")
			c.s[k+" cold"] = append(c.s[k+" cold"], s)
			return err
		})
	}
	if err := runTurned(steps, r); err != nil {
		return err
	}
	last := c.last
	for _, name := range c.subjects(b) {
		cold := last(name + " cold")
		c.ratios[name+" ÷curl"] = append(c.ratios[name+" ÷curl"], cold.wall.Seconds()/last("curl").wall.Seconds())
		c.ratios[name+" ÷tar"] = append(c.ratios[name+" ÷tar"], cold.wall.Seconds()/last("crane").wall.Seconds())
		if b.o.floor {
			c.ratios[name+" ÷cp"] = append(c.ratios[name+" ÷cp"], cold.wall.Seconds()/last("cp").wall.Seconds())
		}
		if l := c.s[name+" warm"]; len(l) > 0 {
			c.ratios[name+" warm"] = append(c.ratios[name+" warm"], float64(l[len(l)-1].wire)/float64(c.needed(b, name+" warm")))
		}
	}
	return nil
}

func (c *cell) ociKeys(b *bench) ([]string, map[string]string) {
	keys := []string{"curl", "crane"}
	if b.o.floor {
		keys = append(keys, "cp")
	}
	names := map[string]string{"curl": "curl+fsync (nginx h2)", "crane": "crane pull+untar", "cp": "cp -r+syncfs"}
	for _, cand := range b.o.cands {
		keys = append(keys, cand.name+" oci cold", cand.name+" oci warm", cand.name+" docker cold")
		names[cand.name+" oci cold"] = cand.name + " oci:// cold"
		names[cand.name+" oci warm"] = cand.name + " oci:// warm"
		names[cand.name+" docker cold"] = cand.name + " docker:// cold"
	}
	return keys, names
}

func (c *cell) printOCI(b *bench) {
	for _, name := range c.subjects(b) {
		if b.o.floor {
			fmt.Printf("%s: cold ÷ cp -r+syncfs (no network) %.2f\n", name, median(c.ratios[name+" ÷cp"]))
		}
		fmt.Printf("%s: cold ÷ curl+fsync %.2f (goal ≤ %s), cold ÷ crane pull+untar %.2f (≤ 0.5)", name, median(c.ratios[name+" ÷curl"]), c.p.curlGoal(), median(c.ratios[name+" ÷tar"]))
		if w := c.ratios[name+" warm"]; len(w) > 0 {
			fmt.Printf(", warm wire ÷ (new + image + index) %.3f (≤ 1.05)", median(w))
		}
		fmt.Println()
	}
}
