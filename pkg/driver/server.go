package driver

import (
	"context"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"k8s.io/klog/v2"
)

// ParseEndpoint splits a CSI endpoint: unix:///path/csi.sock (or a bare
// absolute path), or tcp://host:port for tests.
func ParseEndpoint(ep string) (network, addr string, err error) {
	if strings.HasPrefix(ep, "/") {
		return "unix", ep, nil
	}
	u, err := url.Parse(ep)
	if err != nil {
		return "", "", fmt.Errorf("endpoint %q: %w", ep, err)
	}
	switch u.Scheme {
	case "unix":
		p := u.Path
		if u.Host != "" { // unix://relative/path
			p = u.Host + u.Path
		}
		if p == "" {
			return "", "", fmt.Errorf("endpoint %q: no socket path", ep)
		}
		return "unix", p, nil
	case "tcp":
		if u.Host == "" {
			return "", "", fmt.Errorf("endpoint %q: no address", ep)
		}
		return "tcp", u.Host, nil
	}
	return "", "", fmt.Errorf("endpoint %q: want unix:///path/to/csi.sock", ep)
}

// Listen opens the endpoint. A unix socket is created with mode 0600 (only
// root may talk to the plugin) and replaces a stale socket a killed plugin
// left behind (see ListenUnix).
func Listen(ep string) (net.Listener, error) {
	network, addr, err := ParseEndpoint(ep)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		l, err := ListenUnix(addr)
		if err != nil {
			return nil, fmt.Errorf("listening on %s: %w", ep, err)
		}
		return l, nil
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", ep, err)
	}
	return l, nil
}

// maxSocketPath is the longest path a unix socket address holds
// (sun_path is 108 bytes with its terminating NUL).
const maxSocketPath = 107

// ListenUnix listens on a unix socket at path with mode 0600. The socket is
// bound inside a fresh private (0700) directory beside path, given mode
// 0600 there and renamed onto path: at no moment is path missing, or a
// socket anyone but root can reach, and a stale socket (or file) at path
// is replaced atomically. The temporary directory's name starts with a dot,
// which the kubelet's plugin watcher ignores. Closing the listener removes
// path unless another listener has replaced the socket since.
func ListenUnix(path string) (net.Listener, error) {
	path = filepath.Clean(path)
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil && fi.IsDir() {
		return nil, fmt.Errorf("socket path %s is a directory", path)
	}
	tmpDir, err := os.MkdirTemp(dir, ".sock-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmpDir)
	tmp := filepath.Join(tmpDir, "s")
	if len(tmp) > maxSocketPath || len(path) > maxSocketPath {
		return nil, fmt.Errorf("socket path %s is too long (a unix socket path holds at most %d bytes, and binding needs %d more than the path)",
			path, maxSocketPath, len(tmp)-len(path))
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, error) {
		l.Close()
		return nil, err
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("replacing %s: %w", path, err))
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	return &unixListener{UnixListener: l, path: path, fi: fi}, nil
}

// unixListener removes its socket file on Close, if it is still its own.
type unixListener struct {
	*net.UnixListener
	path string
	fi   fs.FileInfo
	once sync.Once
}

func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() {
		if fi, serr := os.Lstat(l.path); serr == nil && os.SameFile(fi, l.fi) {
			os.Remove(l.path)
		}
	})
	return err
}

// NewGRPCServer returns a gRPC server with the driver's Identity and Node
// services and the logging interceptor.
func (d *Driver) NewGRPCServer(opts ...grpc.ServerOption) *grpc.Server {
	opts = append([]grpc.ServerOption{grpc.UnaryInterceptor(LogInterceptor())}, opts...)
	s := grpc.NewServer(opts...)
	csi.RegisterIdentityServer(s, d)
	csi.RegisterNodeServer(s, d)
	return s
}

// LogInterceptor logs each call at V(4) with secrets stripped and the
// volume context reduced to its keys (its values may carry tokens), and
// failed calls at V(2) with their code. Every call gets a logger with a
// request number in its context.
func LogInterceptor() grpc.UnaryServerInterceptor {
	var seq atomic.Uint64
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		log := klog.FromContext(ctx).WithValues("method", info.FullMethod, "req", seq.Add(1))
		ctx = klog.NewContext(ctx, log)
		if v := log.V(4); v.Enabled() {
			v.Info("gRPC call", "request", redactRequest(req))
		}
		resp, err := handler(ctx, req)
		if err != nil {
			s, _ := status.FromError(err)
			log.V(2).Info("gRPC call failed", "code", s.Code().String(), "message", s.Message())
		} else if v := log.V(5); v.Enabled() {
			v.Info("gRPC call done", "response", protosanitizer.StripSecrets(resp).String())
		}
		return resp, err
	}
}

// redactRequest strips secrets and drops volume context values (kept:
// the keys).
func redactRequest(req any) string {
	m, ok := req.(proto.Message)
	if !ok {
		return protosanitizer.StripSecrets(req).String()
	}
	c := proto.Clone(m).ProtoReflect()
	fd := c.Descriptor().Fields().ByName("volume_context")
	if fd == nil || !c.Has(fd) {
		return protosanitizer.StripSecrets(c.Interface()).String()
	}
	var keys []string
	c.Get(fd).Map().Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
		keys = append(keys, k.String())
		return true
	})
	sort.Strings(keys)
	c.Clear(fd)
	return fmt.Sprintf("%s volume_context_keys:%v", protosanitizer.StripSecrets(c.Interface()), keys)
}
