// Package k8sbin builds the Kubernetes binaries the local cluster runs
// (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl) from the
// k8s.io/kubernetes Go module and keeps them in a version-keyed cache folder,
// so that later runs skip the build.
//
// k8s.io/kubernetes cannot be required as it is: its go.mod replaces every
// k8s.io staging module with a path inside its own repository
// (./staging/src/k8s.io/...), and those folders are not in the published
// module. The builder therefore writes a small wrapper module into the cache
// whose go.mod requires k8s.io/kubernetes and replaces each of those staging
// modules with its published release (v0.N.P for v1.N.P), the list being read
// from k8s.io/kubernetes's own go.mod.
package k8sbin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"golang.org/x/mod/modfile"
	"golang.org/x/mod/semver"
)

// Version is the Kubernetes release the local cluster runs. The host is a
// cgroup v1 machine, which later releases stop supporting: bump deliberately.
const Version = "v1.37.2"

// Commands are the binaries built, by their package under k8s.io/kubernetes/cmd.
var Commands = []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl"}

// Builder builds and caches the binaries of one Kubernetes version.
type Builder struct {
	Version string // e.g. v1.37.2
	// Dir holds everything for this version: src/ (the wrapper module),
	// bin/ (the binaries) and a lock file.
	Dir string
	Go  string    // the go command (default "go")
	Log io.Writer // progress (default os.Stderr)
}

// DefaultCacheDir is $CSI_COMPOSEFS_CACHE, or csi-composefs under the user's
// cache directory ($XDG_CACHE_HOME or $HOME/.cache).
func DefaultCacheDir() (string, error) {
	if d := os.Getenv("CSI_COMPOSEFS_CACHE"); d != "" {
		return d, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("cache directory: %w", err)
	}
	return filepath.Join(d, "csi-composefs"), nil
}

// New returns a builder for version whose folder is <cache>/k8s-<version>.
func New(cache, version string) (*Builder, error) {
	if !semver.IsValid(version) || semver.Major(version) != "v1" || semver.Prerelease(version) != "" {
		return nil, fmt.Errorf("kubernetes version %q: want a release v1.N.P", version)
	}
	return &Builder{Version: version, Dir: filepath.Join(cache, "k8s-"+version), Go: "go", Log: os.Stderr}, nil
}

// BinDir is where the binaries are.
func (b *Builder) BinDir() string { return filepath.Join(b.Dir, "bin") }

// Path of one built command.
func (b *Builder) Path(cmd string) string { return filepath.Join(b.BinDir(), cmd) }

// stamp records what the binaries in bin/ were built from; a different recipe
// (flags, commands, Go version) rebuilds them.
type stamp struct {
	Version  string   `json:"version"`
	Go       string   `json:"go"`
	Commands []string `json:"commands"`
	Recipe   string   `json:"recipe"`
}

// recipeVersion changes whenever the build below changes in a way that
// makes older binaries unfit.
const recipeVersion = "1"

func (b *Builder) wantStamp(ctx context.Context) (stamp, error) {
	out, err := b.goCmd(ctx, "", "env", "GOVERSION").Output()
	if err != nil {
		return stamp{}, fmt.Errorf("go env GOVERSION: %w", err)
	}
	return stamp{Version: b.Version, Go: strings.TrimSpace(string(out)), Commands: Commands, Recipe: recipeVersion}, nil
}

// Cached reports whether every binary is present and was built by the
// current recipe.
func (b *Builder) Cached(ctx context.Context) (bool, error) {
	want, err := b.wantStamp(ctx)
	if err != nil {
		return false, err
	}
	return b.cached(want), nil
}

func (b *Builder) cached(want stamp) bool {
	raw, err := os.ReadFile(filepath.Join(b.BinDir(), ".stamp.json"))
	if err != nil {
		return false
	}
	wantRaw, _ := json.Marshal(want)
	if !bytes.Equal(bytes.TrimSpace(raw), wantRaw) {
		return false
	}
	for _, c := range Commands {
		if fi, err := os.Stat(b.Path(c)); err != nil || !fi.Mode().IsRegular() || fi.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

// Ensure builds the binaries unless the cache already holds them. Two
// callers at once build once: the second waits on the folder's lock.
func (b *Builder) Ensure(ctx context.Context) error {
	want, err := b.wantStamp(ctx)
	if err != nil {
		return err
	}
	if b.cached(want) {
		fmt.Fprintf(b.Log, "kubernetes %s: binaries cached in %s\n", b.Version, b.BinDir())
		return nil
	}
	if err := os.MkdirAll(b.Dir, 0o755); err != nil {
		return err
	}
	unlock, err := lockFile(filepath.Join(b.Dir, ".lock"))
	if err != nil {
		return err
	}
	defer unlock()
	if b.cached(want) { // built by another run while this one waited
		return nil
	}
	start := time.Now()
	src := filepath.Join(b.Dir, "src")
	if err := b.writeWrapper(ctx, src); err != nil {
		return err
	}
	fmt.Fprintf(b.Log, "kubernetes %s: go mod tidy in %s\n", b.Version, src)
	if out, err := b.goCmd(ctx, src, "mod", "tidy").CombinedOutput(); err != nil {
		return fmt.Errorf("go mod tidy in the wrapper module: %w\n%s", err, out)
	}
	tmp := filepath.Join(b.Dir, "bin.tmp")
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return err
	}
	args := []string{"build", "-trimpath", "-ldflags", b.ldflags(time.Now()), "-o", tmp + string(filepath.Separator)}
	for _, c := range Commands {
		args = append(args, "k8s.io/kubernetes/cmd/"+c)
	}
	fmt.Fprintf(b.Log, "kubernetes %s: building %s (a cold build takes about 8 minutes on 2 cores)\n", b.Version, strings.Join(Commands, ", "))
	cmd := b.goCmd(ctx, src, args...)
	cmd.Stdout, cmd.Stderr = b.Log, b.Log
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("building kubernetes %s: %w", b.Version, err)
	}
	wantRaw, _ := json.Marshal(want)
	if err := os.WriteFile(filepath.Join(tmp, ".stamp.json"), append(wantRaw, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.RemoveAll(b.BinDir()); err != nil {
		return err
	}
	if err := os.Rename(tmp, b.BinDir()); err != nil {
		return err
	}
	fmt.Fprintf(b.Log, "kubernetes %s: built in %s into %s\n", b.Version, time.Since(start).Round(time.Second), b.BinDir())
	return nil
}

// ldflags strip the binaries and stamp the version (without the stamps the
// binaries report v0.0.0-master, which the kubelet and kubectl compare).
func (b *Builder) ldflags(now time.Time) string {
	major, minor := "1", strings.TrimPrefix(semver.MajorMinor(b.Version), "v1.")
	flags := []string{"-s", "-w"}
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		for _, kv := range [][2]string{{"gitVersion", b.Version}, {"gitMajor", major}, {"gitMinor", minor},
			{"gitTreeState", "clean"}, {"buildDate", now.UTC().Format(time.RFC3339)}} {
			flags = append(flags, "-X", pkg+"."+kv[0]+"="+kv[1])
		}
	}
	return strings.Join(flags, " ")
}

// writeWrapper writes the wrapper module: go.mod (its go directive and
// replace list derived from k8s.io/kubernetes's go.mod) and tools.go, which
// imports the commands so that go mod tidy keeps their dependencies.
func (b *Builder) writeWrapper(ctx context.Context, dir string) error {
	out, err := b.goCmd(ctx, "", "mod", "download", "-json", "k8s.io/kubernetes@"+b.Version).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s%s", err, ee.Stderr, out)
		}
		return fmt.Errorf("go mod download k8s.io/kubernetes@%s: %w", b.Version, err)
	}
	var info struct{ GoMod, Error string }
	if err := json.Unmarshal(out, &info); err != nil {
		return fmt.Errorf("go mod download -json: %w", err)
	}
	if info.Error != "" || info.GoMod == "" {
		return fmt.Errorf("go mod download k8s.io/kubernetes@%s: %s", b.Version, info.Error)
	}
	k8sMod, err := os.ReadFile(info.GoMod)
	if err != nil {
		return err
	}
	gomod, err := WrapperGoMod(k8sMod, b.Version)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// go.sum is kept across runs: it only grows, and tidy prunes it.
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), gomod, 0o644); err != nil {
		return err
	}
	var tools strings.Builder
	tools.WriteString("//go:build tools\n\n// Package tools keeps the commands' dependencies in go.mod.\npackage tools\n\nimport (\n")
	for _, c := range Commands {
		fmt.Fprintf(&tools, "\t_ %q\n", "k8s.io/kubernetes/cmd/"+c)
	}
	tools.WriteString(")\n")
	return os.WriteFile(filepath.Join(dir, "tools.go"), []byte(tools.String()), 0o644)
}

// WrapperGoMod returns the wrapper module's go.mod for k8s.io/kubernetes at
// version, given that version's own go.mod: the same go directive, a
// requirement on k8s.io/kubernetes, and every module that k8s's go.mod
// replaces with a ./staging/ path replaced by its published v0.N.P release.
func WrapperGoMod(k8sGoMod []byte, version string) ([]byte, error) {
	f, err := modfile.Parse("go.mod", k8sGoMod, nil)
	if err != nil {
		return nil, fmt.Errorf("parsing k8s.io/kubernetes's go.mod: %w", err)
	}
	if f.Module == nil || f.Module.Mod.Path != "k8s.io/kubernetes" {
		return nil, errors.New("not k8s.io/kubernetes's go.mod")
	}
	if f.Go == nil {
		return nil, errors.New("k8s.io/kubernetes's go.mod has no go directive")
	}
	staging := "v0" + strings.TrimPrefix(version, "v1")
	var mods []string
	for _, r := range f.Replace {
		if strings.HasPrefix(r.New.Path, "./staging/") {
			mods = append(mods, r.Old.Path)
		}
	}
	if len(mods) == 0 {
		return nil, errors.New("k8s.io/kubernetes's go.mod replaces no module with a ./staging/ path")
	}
	sort.Strings(mods)
	w := new(modfile.File)
	if err := w.AddModuleStmt("csi-composefs-e2e/k8s"); err != nil {
		return nil, err
	}
	if err := w.AddGoStmt(f.Go.Version); err != nil {
		return nil, err
	}
	if err := w.AddRequire("k8s.io/kubernetes", version); err != nil {
		return nil, err
	}
	for _, m := range mods {
		if err := w.AddReplace(m, "", m, staging); err != nil {
			return nil, err
		}
	}
	w.Cleanup()
	return w.Format()
}

func (b *Builder) goCmd(ctx context.Context, dir string, args ...string) *exec.Cmd {
	goBin := b.Go
	if goBin == "" {
		goBin = "go"
	}
	cmd := exec.CommandContext(ctx, goBin, args...)
	cmd.Dir = dir
	// The wrapper is a module of its own: no workspace, no vendoring, static
	// binaries (the kubelet runs pods from them; no libc needed).
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod -buildvcs=false", "CGO_ENABLED=0")
	return cmd
}

// lockFile takes an exclusive flock on path, waiting for it.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}
