package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
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

// Listen opens the endpoint, replacing a stale socket file.
func Listen(ep string) (net.Listener, error) {
	network, addr, err := ParseEndpoint(ep)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := os.MkdirAll(filepath.Dir(addr), 0o750); err != nil {
			return nil, fmt.Errorf("listening on %s: %w", ep, err)
		}
		if err := os.Remove(addr); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("removing stale socket %s: %w", addr, err)
		}
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", ep, err)
	}
	return l, nil
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
