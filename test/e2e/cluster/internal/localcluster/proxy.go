package localcluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"time"
)

// ServeProxy forwards TCP connections from listen to to until ctx ends:
// the kubernetes Service address to the API server on loopback, for pods
// on the host network that use the in-cluster configuration.
func ServeProxy(ctx context.Context, listen, to string) error {
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	go func() { <-ctx.Done(); l.Close() }()
	for {
		in, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go func() {
			defer in.Close()
			var d net.Dialer
			out, err := d.DialContext(ctx, "tcp", to)
			if err != nil {
				return
			}
			defer out.Close()
			var wg sync.WaitGroup
			wg.Add(2)
			pipe := func(dst, src net.Conn) {
				defer wg.Done()
				io.Copy(dst, src) //nolint:errcheck
				if tc, ok := dst.(*net.TCPConn); ok {
					tc.CloseWrite()
				}
			}
			go pipe(out, in)
			go pipe(in, out)
			wg.Wait()
		}()
	}
}

// ServeDir serves a folder over HTTP (a static repository) until ctx ends.
func ServeDir(ctx context.Context, dir, listen string) error {
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: http.FileServer(http.Dir(dir)), ReadHeaderTimeout: 10 * time.Second}
	go func() { <-ctx.Done(); srv.Close() }()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// StartRepoServer serves dir on listen (loopback) as a daemon of the
// cluster: Down stops it.
func (c *Cluster) StartRepoServer(dir, listen string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return err
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("serve: %s is not a loopback address", listen)
	}
	c.stopDaemon("repo-server", 5*time.Second)
	if err := c.startDaemon("repo-server", nil, c.Self, "serve-dir", "--work="+c.Work, "--dir="+abs, "--listen="+listen); err != nil {
		return err
	}
	return c.waitFor("repository on "+listen, "repo-server", 10*time.Second, func() error {
		conn, err := net.Dial("tcp", listen)
		if err == nil {
			conn.Close()
		}
		return err
	})
}
