package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// Ports in the server namespace: nginx on its loopback, the fault proxy on
// the link's address in front of it.
const (
	nginxHTTP  = 8080 // HTTP/1.1
	nginxHTTPS = 8443 // HTTP/2 over TLS (and HTTP/1.1 over TLS by ALPN)
	proxyHTTP  = 80
	proxyHTTPS = 443
	toxiAPI    = "127.0.0.1:8474"
)

// writeCert writes a self-signed certificate for the given addresses.
func writeCert(dir string, ips ...string) (certFile, keyFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "csi-composefs bench"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(72 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:         true, BasicConstraintsValid: true,
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", "", err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", err
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return "", "", err
	}
	return certFile, keyFile, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
}

// nginx serves www over HTTP/1.1 and over HTTP/2 with TLS, with the
// distribution's defaults but for the log (what was sent, for the request
// and byte counts) and keep-alive (a pull reuses its connections).
type nginx struct {
	dir, www, cert, key string
	cmd                 *exec.Cmd
	log                 logCounter
}

func (n *nginx) accessLog() string { return filepath.Join(n.dir, "access.log") }

func (n *nginx) start(ns string) error {
	conf := fmt.Sprintf(`worker_processes 2;
pid %[1]s/nginx.pid;
error_log %[1]s/nginx-error.log;
daemon off;
events { worker_connections 8192; }
http {
	default_type application/octet-stream;
	log_format bench '$server_protocol $status $bytes_sent $request_uri';
	access_log %[1]s/access.log bench;
	sendfile on;
	tcp_nopush on;
	keepalive_requests 1000000;
	keepalive_timeout 300;
	client_body_temp_path %[1]s/tmp;
	proxy_temp_path %[1]s/tmp;
	fastcgi_temp_path %[1]s/tmp;
	uwsgi_temp_path %[1]s/tmp;
	scgi_temp_path %[1]s/tmp;
	server {
		listen 127.0.0.1:%[3]d;
		root %[2]s;
	}
	server {
		listen 127.0.0.1:%[4]d ssl http2;
		ssl_certificate %[5]s;
		ssl_certificate_key %[6]s;
		root %[2]s;
	}
}
`, n.dir, n.www, nginxHTTP, nginxHTTPS, n.cert, n.key)
	if err := os.MkdirAll(filepath.Join(n.dir, "tmp"), 0o755); err != nil {
		return err
	}
	cf := filepath.Join(n.dir, "nginx.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o644); err != nil {
		return err
	}
	bin, err := exec.LookPath("nginx")
	if err != nil {
		bin = "/usr/sbin/nginx"
	}
	n.cmd = exec.Command("ip", "netns", "exec", ns, bin, "-c", cf, "-p", n.dir, "-g", "user root;")
	n.cmd.Stderr = os.Stderr
	if err := n.cmd.Start(); err != nil {
		return err
	}
	for range 100 {
		if exec.Command("ip", "netns", "exec", ns, "curl", "-s", "-o", "/dev/null",
			fmt.Sprintf("http://127.0.0.1:%d/", nginxHTTP)).Run() == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("nginx did not start (see %s/nginx-error.log)", n.dir)
}

// requests counts the access log's lines (requests served so far).
func (n *nginx) requests() int64 {
	n.log.path = n.accessLog()
	return n.log.count()
}

// stop asks the master to stop its workers and waits.
func (n *nginx) stop() {
	if n.cmd != nil && n.cmd.Process != nil {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = n.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = n.cmd.Process.Kill()
		}
	}
}
