package registry

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// bin is the csi-composefs binary, built once by TestMain.
var bin string

func TestMain(m *testing.M) {
	code := func() int {
		if os.Geteuid() != 0 {
			fmt.Println("registry e2e: skipped, it mounts composefs images and needs root")
			return m.Run()
		}
		dir, err := os.MkdirTemp("", "csi-composefs-registry-e2e-")
		if err != nil {
			fmt.Println(err)
			return 1
		}
		defer os.RemoveAll(dir)
		bin = filepath.Join(dir, "csi-composefs")
		// Built in the product's module (../../..), with its own go.mod.
		cmd := exec.Command("go", "build", "-o", bin, "./cmd/csi-composefs")
		cmd.Dir = filepath.Join("..", "..", "..")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Printf("building csi-composefs: %v\n%s", err, out)
			return 1
		}
		return m.Run()
	}()
	os.Exit(code)
}

func needBinary(t *testing.T) {
	t.Helper()
	if bin == "" {
		t.Skip("needs root (real mounts)")
	}
}

// cli runs the binary and returns its standard output.
func cli(t *testing.T, env []string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("csi-composefs %s: %w\n%s", strings.Join(args, " "), err, errb.String())
	}
	t.Logf("csi-composefs %s:\n%s", args[0]+" "+args[1], errb.String())
	return out.String(), nil
}

// plugin is one `csi-composefs serve` with a store of its own.
type plugin struct {
	store string
	node  csi.NodeClient
	cmd   *exec.Cmd
	done  chan struct{}
	log   string
}

// startPlugin runs serve on a short socket path (sockets hold 107 bytes)
// with registration off, and waits until Probe says ready.
func startPlugin(t *testing.T, flags ...string) *plugin {
	t.Helper()
	dir, err := os.MkdirTemp("", "cfs-reg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	p := &plugin{store: filepath.Join(dir, "store"), done: make(chan struct{}), log: filepath.Join(t.TempDir(), "plugin.log")}
	sock := filepath.Join(dir, "csi.sock")
	logf, err := os.Create(p.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	p.cmd = exec.Command(bin, append([]string{"serve", "--endpoint", "unix://" + sock, "--store-dir", p.store,
		"--node-id", "registry-e2e", "--metrics-address", "", "--gc-interval", "0", "--registration", "none", "-v", "2"}, flags...)...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.done
		if t.Failed() {
			b, _ := os.ReadFile(p.log)
			t.Logf("plugin log:\n%s", b)
		}
	})
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	id := csi.NewIdentityClient(conn)
	for i := 0; ; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		r, err := id.Probe(ctx, &csi.ProbeRequest{})
		cancel()
		if err == nil && r.GetReady().GetValue() {
			break
		}
		select {
		case <-p.done:
			b, _ := os.ReadFile(p.log)
			t.Fatalf("the plugin exited at start:\n%s", b)
		default:
		}
		if i > 600 {
			t.Fatalf("the plugin is not ready: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.node = csi.NewNodeClient(conn)
	return p
}

// publish publishes a volume at a new target, unmounted at the test's end.
func (p *plugin) publish(t *testing.T, vol string, vc, secrets map[string]string) (string, error) {
	t.Helper()
	target := filepath.Join(t.TempDir(), "pod", "vol")
	t.Cleanup(func() {
		for {
			if _, m, _ := cfs.IsMounted(target); !m || cfs.Unmount(target, true) != nil {
				return
			}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	_, err := p.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
		VolumeId: vol, TargetPath: target, VolumeContext: vc, Secrets: secrets, Readonly: true,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY},
		},
	})
	return target, err
}

// sourceTree writes a tree with what a reader can get wrong (nested
// folders, inline and external files, an empty file, duplicate content, a
// symlink) under a new folder: n files of seeded random content, the
// files whose index is in changed get other content.
func sourceTree(t *testing.T, n int, changed func(i int) bool) string {
	t.Helper()
	dir := t.TempDir()
	for i := 0; i < n; i++ {
		seed := uint64(i)
		if changed != nil && changed(i) {
			seed += 1 << 32
		}
		size := 4<<10 + (i*7919)%(60<<10)
		if i%9 == 4 {
			size = 1 + i%60 // inline
		}
		writeFile(t, filepath.Join(dir, fmt.Sprintf("d%d/sub%d/f%04d", i%5, i%3, i)), string(randomBytes(size, seed)))
	}
	writeFile(t, filepath.Join(dir, "etc/empty"), "")
	writeFile(t, filepath.Join(dir, "etc/copy"), string(randomBytes(100<<10, 99)))
	writeFile(t, filepath.Join(dir, "etc/copy2"), string(randomBytes(100<<10, 99)))
	if err := os.Symlink("copy", filepath.Join(dir, "etc/link")); err != nil {
		t.Fatal(err)
	}
	// The files are written 0600; the image keeps the modes.
	_ = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			err = os.Chmod(p, 0o644)
		}
		return err
	})
	return dir
}

func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 3))
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := i; j < min(i+8, n); j++ {
			b[j] = byte(v >> (8 * (j - i)))
		}
	}
	return b
}

// sameTree compares every entry under got with want: type, permission
// bits, content and symlink targets, and nothing more.
func sameTree(t *testing.T, got, want string) int {
	t.Helper()
	n := 0
	err := filepath.Walk(want, func(p string, wi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(want, p)
		gp := filepath.Join(got, rel)
		gi, err := os.Lstat(gp)
		if err != nil {
			t.Errorf("%s: %v", rel, err)
			return nil
		}
		n++
		if gi.Mode().Type() != wi.Mode().Type() || (rel != "." && gi.Mode().Perm() != wi.Mode().Perm()) {
			t.Errorf("%s: mode %v, want %v", rel, gi.Mode(), wi.Mode())
		}
		switch {
		case wi.Mode().IsRegular():
			a, err1 := os.ReadFile(gp)
			b, err2 := os.ReadFile(p)
			if err1 != nil || err2 != nil || !bytes.Equal(a, b) {
				t.Errorf("%s: content differs (%v, %v)", rel, err1, err2)
			}
		case wi.Mode()&os.ModeSymlink != 0:
			a, _ := os.Readlink(gp)
			b, _ := os.Readlink(p)
			if a != b {
				t.Errorf("%s: symlink to %q, want %q", rel, a, b)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	m := 0
	_ = filepath.Walk(got, func(string, os.FileInfo, error) error { m++; return nil })
	if m != n {
		t.Errorf("the volume has %d entries, the source %d", m, n)
	}
	return n
}
