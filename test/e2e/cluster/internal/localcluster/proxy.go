package localcluster

import (
	"context"
	"io"
	"net"
	"sync"
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
