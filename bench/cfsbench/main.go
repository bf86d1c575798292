// Command cfsbench measures the composefs image tools against the C tools
// 1.0.8 (installed by hack/c-tools.sh into a cache folder outside the
// repository) in the same run, and prints ours ÷ C for wall time, CPU time
// (user + system) and peak RSS, as medians of interleaved runs (the order
// alternates each round, after one warm-up round):
//
//	go run ./bench/cfsbench [-runs 5] [-tree /usr/share] [-cases build,store,fromfile,dump,walk]
//
// Cases: build (image build DIR, no store) vs mkcomposefs DIR; store (the
// same with --digest-store into an empty store on the same filesystem as the
// work folder, a fresh store each run, all removed at the end) vs
// mkcomposefs --digest-store; fromfile (image build --from-file of the
// tree's dump, and of composefs's cs9-x86_64-developer dump when the shared
// test assets are beside the repository) vs mkcomposefs --from-file; dump
// (image dump vs composefs-info dump of the tree's image and the cs9 image);
// walk (the reader's Open and a walk of the tree, by bench/cfsprof, which
// links only the cfs package, vs composefs-info dump).
//
// It needs Go, the Debian archive (for the C tools) and a writable -work
// folder (default: a temporary folder under /var/tmp).
package main

import (
	"bytes"
	"compress/gzip"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

type measurement struct {
	wall, cpu time.Duration
	rss       int64 // KiB
}

type tool struct {
	name string
	args []string
	env  []string
	// prepare runs before each run, untimed (a fresh store).
	prepare func(run int) []string
}

type benchCase struct {
	name, goal string
	c, ours    tool
}

func main() {
	runs := flag.Int("runs", 5, "measured runs of each tool per case (after one warm-up run)")
	tree := flag.String("tree", "/usr/share", "directory tree to build images of")
	work := flag.String("work", "", "work folder (default: a new temporary folder under /var/tmp, removed at the end)")
	cases := flag.String("cases", "build,store,fromfile,dump,walk", "cases to run")
	keep := flag.Bool("keep", false, "keep the work folder")
	flag.Parse()

	if _, err := os.Stat(timeTool); err != nil {
		fatal(fmt.Errorf("%s is needed (apt-get install time): %w", timeTool, err))
	}
	root := repoRoot()
	dir := *work
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("/var/tmp", "cfsbench-"); err != nil {
			fatal(err)
		}
		if !*keep {
			defer os.RemoveAll(dir)
		}
	}
	ctools := strings.TrimSpace(string(must(output(exec.Command(filepath.Join(root, "hack", "c-tools.sh"))))))
	mk, info := filepath.Join(ctools, "mkcomposefs"), filepath.Join(ctools, "composefs-info")
	ours, walker := filepath.Join(dir, "csi-composefs"), filepath.Join(dir, "cfsprof")
	for bin, pkg := range map[string]string{ours: "./cmd/csi-composefs", walker: "./bench/cfsprof"} {
		cmd := exec.Command("go", "build", "-trimpath", "-o", bin, pkg)
		cmd.Dir, cmd.Stderr = root, os.Stderr
		if err := cmd.Run(); err != nil {
			fatal(fmt.Errorf("building %s: %w", pkg, err))
		}
	}

	// Inputs: the tree's image and dump (made by the C tools), the cs9 dump and image.
	treeImg, treeDump := filepath.Join(dir, "tree.cfs"), filepath.Join(dir, "tree.dump")
	must(output(exec.Command(mk, *tree, treeImg)))
	writeFile(treeDump, must(output(exec.Command(info, "dump", treeImg))))
	type dumpInput struct{ name, dump, img string }
	dumps := []dumpInput{{filepath.Base(*tree), treeDump, treeImg}}
	if gz, err := os.ReadFile(filepath.Join(root, "..", "shared", "testdata", "composefs-upstream", "cs9-x86_64-developer.dump.gz")); err == nil {
		zr, err := gzip.NewReader(bytes.NewReader(gz))
		if err != nil {
			fatal(err)
		}
		d := filepath.Join(dir, "cs9.dump")
		writeFile(d, must(io.ReadAll(zr)))
		img := filepath.Join(dir, "cs9.cfs")
		must(output(exec.Command(mk, "--from-file", d, img)))
		dumps = append(dumps, dumpInput{"cs9-developer", d, img})
	} else {
		fmt.Fprintf(os.Stderr, "cs9 dump not found beside the repository (%v): tree inputs only\n", err)
	}
	entries := bytes.Count(must(os.ReadFile(treeDump)), []byte("\n"))
	fmt.Printf("tree %s: %d entries, image %d bytes; %d runs each, interleaved, medians\n\n", *tree, entries, fileSize(treeImg), *runs)

	out := func(name string) string { return filepath.Join(dir, name) }
	storeN := 0
	freshStore := func(prefix string) func(int) []string {
		return func(int) []string {
			storeN++
			s := out(fmt.Sprintf("%s-store-%d", prefix, storeN))
			if err := os.Mkdir(s, 0o755); err != nil {
				fatal(err)
			}
			return []string{"--digest-store=" + s}
		}
	}
	var all []benchCase
	want := map[string]bool{}
	for _, c := range strings.Split(*cases, ",") {
		want[c] = true
	}
	if want["build"] {
		all = append(all, benchCase{"image build " + *tree + ", no store", "≤ 1.0 wall",
			tool{name: "mkcomposefs", args: []string{mk, *tree, out("c.cfs")}},
			tool{name: "ours", args: []string{ours, "image", "build", *tree, out("o.cfs")}}})
	}
	if want["store"] {
		all = append(all, benchCase{"image build " + *tree + " --digest-store (empty store)", "≤ 1.0 wall, ≤ 1.5 CPU",
			tool{name: "mkcomposefs", args: []string{mk, *tree, out("c.cfs")}, prepare: freshStore("c")},
			tool{name: "ours", args: []string{ours, "image", "build", *tree, out("o.cfs")}, prepare: freshStore("o")}})
	}
	for _, d := range dumps {
		if want["fromfile"] {
			all = append(all, benchCase{"--from-file " + d.name + " dump", "≤ 1.0 wall",
				tool{name: "mkcomposefs", args: []string{mk, "--from-file", d.dump, out("c.cfs")}},
				tool{name: "ours", args: []string{ours, "image", "build", "--from-file", d.dump, out("o.cfs")}}})
		}
		if want["dump"] {
			all = append(all, benchCase{"image dump " + d.name + " vs composefs-info dump", "≤ 1.0 wall, RSS ≤ 1.0",
				tool{name: "composefs-info", args: []string{info, "dump", d.img}},
				tool{name: "ours", args: []string{ours, "image", "dump", d.img}}})
		}
		if want["walk"] {
			all = append(all, benchCase{"Open + walk " + d.name + " vs composefs-info dump", "≤ 1.0 wall, RSS ≤ 1.0",
				tool{name: "composefs-info", args: []string{info, "dump", d.img}},
				tool{name: "ours", args: []string{walker, "-lenient", "walk", d.img}}})
		}
	}

	fmt.Printf("| case | C wall | ours wall | wall ÷ | C CPU | ours CPU | CPU ÷ | C RSS | ours RSS | RSS ÷ | goal |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, bc := range all {
		var cm, om []measurement
		for r := 0; r <= *runs; r++ {
			pair := []*tool{&bc.c, &bc.ours}
			if r%2 == 1 {
				pair = []*tool{&bc.ours, &bc.c}
			}
			for _, t := range pair {
				m := runOnce(t, r)
				if r == 0 {
					continue // warm-up
				}
				if t == &bc.c {
					cm = append(cm, m)
				} else {
					om = append(om, m)
				}
			}
		}
		c, o := median(cm), median(om)
		fmt.Printf("| %s | %.2f s | %.2f s | **%.2f** | %.2f s | %.2f s | **%.2f** | %.1f MiB | %.1f MiB | **%.2f** | %s |\n",
			bc.name, c.wall.Seconds(), o.wall.Seconds(), ratio(o.wall, c.wall),
			c.cpu.Seconds(), o.cpu.Seconds(), ratio(o.cpu, c.cpu),
			float64(c.rss)/1024, float64(o.rss)/1024, float64(o.rss)/float64(c.rss), bc.goal)
	}
	// A Go program's floor: the CLI binary doing next to nothing.
	base := runOnce(&tool{name: "ours", args: []string{ours, "image", "dump", "--help"}}, 1)
	fmt.Printf("\nfloor: `csi-composefs image dump --help` peaks at %.1f MiB RSS (the binary's own pages); bench/cfsprof links only pkg/cfs.\n", float64(base.rss)/1024)
}

// runOnce runs t once under GNU time, which reports the wait4 resource
// usage of a child it forked itself: wall time, user + system CPU time, peak
// RSS. (A child started by this program directly would report this
// program's own peak RSS as its floor: Go starts children with vfork, and
// exec carries the old address space's high-water mark over.) Standard
// output goes to /dev/null; a failure is fatal.
func runOnce(t *tool, run int) measurement {
	args := t.args
	if t.prepare != nil {
		extra := t.prepare(run)
		args = append(append(append([]string{}, args[:len(args)-2]...), extra...), args[len(args)-2:]...)
	}
	report, err := os.CreateTemp("", "cfsbench-time-")
	if err != nil {
		fatal(err)
	}
	report.Close()
	defer os.Remove(report.Name())
	cmd := exec.Command(timeTool, append([]string{"-f", "%e %U %S %M", "-o", report.Name()}, args...)...)
	cmd.Env = append(os.Environ(), t.env...)
	var errOut bytes.Buffer
	cmd.Stderr = &errOut
	if err := cmd.Run(); err != nil {
		fatal(fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, errOut.Bytes()))
	}
	var wall, user, sys float64
	var rss int64
	b := must(os.ReadFile(report.Name()))
	if _, err := fmt.Sscanf(string(b), "%f %f %f %d", &wall, &user, &sys, &rss); err != nil {
		fatal(fmt.Errorf("reading the report of %s: %q: %w", timeTool, b, err))
	}
	sec := func(f float64) time.Duration { return time.Duration(f * float64(time.Second)) }
	return measurement{wall: sec(wall), cpu: sec(user + sys), rss: rss}
}

// timeTool is GNU time (Debian package time).
const timeTool = "/usr/bin/time"

func median(ms []measurement) measurement {
	pick := func(f func(measurement) int64) int64 {
		v := make([]int64, len(ms))
		for i, m := range ms {
			v[i] = f(m)
		}
		slices.Sort(v)
		if len(v)%2 == 1 {
			return v[len(v)/2]
		}
		return (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	return measurement{
		wall: time.Duration(pick(func(m measurement) int64 { return int64(m.wall) })),
		cpu:  time.Duration(pick(func(m measurement) int64 { return int64(m.cpu) })),
		rss:  pick(func(m measurement) int64 { return m.rss }),
	}
}

func ratio(a, b time.Duration) float64 { return a.Seconds() / b.Seconds() }

func repoRoot() string {
	dir := must(os.Getwd())
	for {
		if _, err := os.Stat(filepath.Join(dir, "hack", "c-tools.sh")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			fatal(fmt.Errorf("run cfsbench inside the csi-composefs repository"))
		}
		dir = parent
	}
}

func output(cmd *exec.Cmd) ([]byte, error) {
	var errOut bytes.Buffer
	cmd.Stderr = &errOut
	b, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, errOut.Bytes())
	}
	return b, nil
}

func writeFile(path string, b []byte) {
	if err := os.WriteFile(path, b, 0o644); err != nil {
		fatal(err)
	}
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		fatal(err)
	}
	return fi.Size()
}

func must[T any](v T, err error) T {
	if err != nil {
		fatal(err)
	}
	return v
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "cfsbench:", err)
	os.Exit(1)
}
