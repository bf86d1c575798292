package driver

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	utilversion "k8s.io/apimachinery/pkg/util/version"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// dialUnix connects to a unix socket path the way the kubelet does (a
// context dialer on the bare path).
func dialUnix(t *testing.T, path string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// kubeletRegisters does what the kubelet's plugin watcher and CSI plugin
// handler do with a registration socket: GetInfo, check the type and the
// versions (the highest must be 1.x), then NodeGetInfo on the endpoint it
// was given. It returns the info.
func kubeletRegisters(t *testing.T, regSock string) *registerapi.PluginInfo {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := registerapi.NewRegistrationClient(dialUnix(t, regSock)).GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatalf("GetInfo: %v", err)
	}
	if info.GetType() != registerapi.CSIPlugin {
		t.Fatalf("type %q, want %q", info.GetType(), registerapi.CSIPlugin)
	}
	v, err := utilversion.HighestSupportedVersion(info.GetSupportedVersions())
	if err != nil || v.Major() != 1 {
		t.Fatalf("versions %q: highest %v (%v), the kubelet wants a 1.x", info.GetSupportedVersions(), v, err)
	}
	if !filepath.IsAbs(info.GetEndpoint()) {
		t.Fatalf("endpoint %q is not an absolute socket path", info.GetEndpoint())
	}
	ni, err := csi.NewNodeClient(dialUnix(t, info.GetEndpoint())).NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		t.Fatalf("NodeGetInfo on the registered endpoint %s: %v", info.GetEndpoint(), err)
	}
	if ni.GetNodeId() == "" {
		t.Fatal("NodeGetInfo: empty node id")
	}
	pi, err := csi.NewIdentityClient(dialUnix(t, info.GetEndpoint())).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil || pi.GetName() != info.GetName() {
		t.Fatalf("GetPluginInfo on the endpoint: %v, %v; registered name %q", pi, err, info.GetName())
	}
	return info
}

// fileID tells files at a path apart: the inode number (which a new file
// may reuse) and the change time.
type fileID struct {
	ino   uint64
	ctime syscall.Timespec
}

func idOf(path string) (fileID, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return fileID{}, err
	}
	st := fi.Sys().(*syscall.Stat_t)
	return fileID{st.Ino, st.Ctim}, nil
}

// waitFor polls cond for up to 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestRegistration: the kubelet finds the plugin through its registration
// socket (mode 0600), validates what GetInfo returns and reaches the CSI
// endpoint it names; a registration the kubelet reports as failed makes the
// socket anew (the watcher sees a new socket and tries again); stopping
// removes the socket.
func TestRegistration(t *testing.T) {
	const name = "reg.test.csi.dev"
	root := t.TempDir() // stands for the kubelet root
	endpoint := filepath.Join(root, "plugins", name, "csi.sock")
	regSock := filepath.Join(root, "plugins_registry", name+"-reg.sock")

	e := newTestEnv(t, Config{DriverName: name})
	l, err := Listen("unix://" + endpoint)
	if err != nil {
		t.Fatal(err)
	}
	gs := e.d.NewGRPCServer()
	go gs.Serve(l)
	t.Cleanup(gs.Stop)

	r, err := NewRegistrar(name, RegistrationConfig{Enabled: true, Socket: regSock, Endpoint: endpoint, RetryMin: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- r.Run(ctx) }()
	waitFor(t, "the registration socket", func() bool { _, err := os.Stat(regSock); return err == nil })

	fi, err := os.Lstat(regSock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("registration socket mode %v, want a socket with mode 0600", fi.Mode())
	}
	info := kubeletRegisters(t, regSock)
	if info.GetName() != name || info.GetEndpoint() != endpoint {
		t.Errorf("GetInfo: name %q endpoint %q, want %q %q", info.GetName(), info.GetEndpoint(), name, endpoint)
	}

	// The kubelet reports a failure (e.g. NodeGetInfo timed out).
	before, err := idOf(regSock)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	client := registerapi.NewRegistrationClient(dialUnix(t, regSock))
	if _, err := client.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: false, Error: "plugin timed out"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a new registration socket", func() bool {
		id, err := idOf(regSock)
		return err == nil && id != before
	})
	t.Logf("registration socket made anew %v after the kubelet reported a failure", time.Since(start))
	kubeletRegisters(t, regSock)
	if r.Registered() {
		t.Error("Registered() after a failed registration")
	}
	if _, err := registerapi.NewRegistrationClient(dialUnix(t, regSock)).NotifyRegistrationStatus(ctx,
		&registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if !r.Registered() {
		t.Error("not Registered() after the kubelet confirmed it")
	}

	cancel()
	select {
	case err := <-ran:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
	if _, err := os.Lstat(regSock); !os.IsNotExist(err) {
		t.Errorf("registration socket still there after stopping: %v", err)
	}
}

func TestNewRegistrarRefuses(t *testing.T) {
	ok := RegistrationConfig{Socket: "/k/plugins_registry/a-reg.sock", Endpoint: "/k/plugins/a/csi.sock"}
	for _, c := range []struct {
		name string
		cfg  RegistrationConfig
	}{
		{"", ok},
		{"a/b", ok},
		{"-a", ok},
		{"a.", ok},
		{string(make([]byte, 64)), ok},
		{"a", RegistrationConfig{Socket: "rel/a-reg.sock", Endpoint: ok.Endpoint}},
		{"a", RegistrationConfig{Socket: ok.Socket, Endpoint: "csi.sock"}},
	} {
		if _, err := NewRegistrar(c.name, c.cfg); err == nil {
			t.Errorf("NewRegistrar(%q, %+v) accepted", c.name, c.cfg)
		}
	}
	if _, err := NewRegistrar("composefs.csi.dev", ok); err != nil {
		t.Error(err)
	}
}

// TestListenUnix: sockets get mode 0600 whatever the umask; a stale socket
// or file is replaced; closing a listener whose socket another listener
// replaced leaves the new socket alone; a directory is not replaced.
func TestListenUnix(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "csi.sock")

	// A stale socket from a killed plugin: bound, never unlinked.
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		t.Fatal(err)
	}
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()

	l1, err := ListenUnix(path)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	defer l1.Close()
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v (%v), want a socket with mode 0600", fi.Mode(), err)
	}
	accepts := func(l net.Listener) {
		t.Helper()
		done := make(chan error, 1)
		go func() {
			c, err := l.Accept()
			if err == nil {
				c.Close()
			}
			done <- err
		}()
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	accepts(l1)

	// A new plugin replaces the socket of one still running; the old one
	// closing must not remove the new socket.
	l2, err := ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	l1.Close()
	accepts(l2)
	l2.Close()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("socket left after its listener closed: %v", err)
	}

	// A regular file in the way is replaced; a directory is refused.
	if err := os.WriteFile(path, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	l3, err := ListenUnix(path)
	if err != nil {
		t.Fatalf("over a file: %v", err)
	}
	l3.Close()
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := ListenUnix(path); err == nil {
		t.Error("a directory at the socket path was replaced")
	}
	// Nothing but the socket path is left in its directory.
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Errorf("directory holds %d entries, want only the socket path: %v", len(ents), ents)
	}
}
