package localcluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// certSpec is one certificate signed by the cluster CA.
type certSpec struct {
	name string // file stem: <name>.crt, <name>.key
	cn   string
	orgs []string
	ips  []net.IP
	dns  []string
	eku  x509.ExtKeyUsage
}

type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// writePKI creates the CA, the serving and client certificates, the
// service-account signing pair and the kubeconfigs (ECDSA P-256, valid 30
// days). An existing PKI folder is kept: a cluster restarted with Up keeps
// its identities.
func (c *Cluster) writePKI() error {
	dir := c.PKI()
	if _, err := os.Stat(filepath.Join(dir, "done")); err == nil {
		return nil
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	root, err := newCA(dir)
	if err != nil {
		return err
	}
	lo := net.ParseIP("127.0.0.1")
	specs := []certSpec{
		{name: "apiserver", cn: "kube-apiserver", ips: []net.IP{lo, net.ParseIP(APIServiceIP)},
			dns: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
			eku: x509.ExtKeyUsageServerAuth},
		{name: "admin", cn: "admin", orgs: []string{"system:masters"}, eku: x509.ExtKeyUsageClientAuth},
		// The CN must be the node name or the Node authorizer refuses it.
		{name: "kubelet-client", cn: "system:node:" + c.Node, orgs: []string{"system:nodes"}, eku: x509.ExtKeyUsageClientAuth},
		{name: "kubelet-serving", cn: "system:node:" + c.Node, orgs: []string{"system:nodes"}, ips: []net.IP{lo},
			dns: []string{c.Node, "localhost"}, eku: x509.ExtKeyUsageServerAuth},
		{name: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}, eku: x509.ExtKeyUsageClientAuth},
		{name: "controller-manager", cn: "system:kube-controller-manager", eku: x509.ExtKeyUsageClientAuth},
		{name: "scheduler", cn: "system:kube-scheduler", eku: x509.ExtKeyUsageClientAuth},
	}
	for _, s := range specs {
		if err := root.issue(dir, s); err != nil {
			return fmt.Errorf("certificate %s: %w", s.name, err)
		}
	}
	// Service-account token signing pair (the API server signs bound tokens).
	sa, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	if err := writeKey(filepath.Join(dir, "sa.key"), sa); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&sa.PublicKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
		return err
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", APIServerPort)
	for _, k := range []struct{ file, user, cert string }{
		{"admin.kubeconfig", "admin", "admin"},
		{"kubelet.kubeconfig", "system:node:" + c.Node, "kubelet-client"},
		{"controller-manager.kubeconfig", "system:kube-controller-manager", "controller-manager"},
		{"scheduler.kubeconfig", "system:kube-scheduler", "scheduler"},
	} {
		if err := writeKubeconfig(filepath.Join(dir, k.file), server, dir, k.user, k.cert); err != nil {
			return err
		}
	}
	return os.WriteFile(filepath.Join(dir, "done"), nil, 0o644)
}

func newCA(dir string) (*ca, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "csi-composefs-e2e-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	if err := writeCert(filepath.Join(dir, "ca.crt"), der); err != nil {
		return nil, err
	}
	if err := writeKey(filepath.Join(dir, "ca.key"), key); err != nil {
		return nil, err
	}
	return &ca{cert: cert, key: key}, nil
}

func (a *ca) issue(dir string, s certSpec) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: s.cn, Organization: s.orgs},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(30 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{s.eku},
		IPAddresses:  s.ips,
		DNSNames:     s.dns,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, &key.PublicKey, a.key)
	if err != nil {
		return err
	}
	if err := writeCert(filepath.Join(dir, s.name+".crt"), der); err != nil {
		return err
	}
	return writeKey(filepath.Join(dir, s.name+".key"), key)
}

func writeCert(path string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

// writeKubeconfig writes a kubeconfig with embedded credentials, so it can
// be copied elsewhere and still work.
func writeKubeconfig(path, server, pki, user, cert string) error {
	read := func(name string) (string, error) {
		b, err := os.ReadFile(filepath.Join(pki, name))
		return base64.StdEncoding.EncodeToString(b), err
	}
	caData, err := read("ca.crt")
	if err != nil {
		return err
	}
	certData, err := read(cert + ".crt")
	if err != nil {
		return err
	}
	keyData, err := read(cert + ".key")
	if err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %q
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: local
  context:
    cluster: local
    user: %q
current-context: local
`, server, caData, user, certData, keyData, user)
	return os.WriteFile(path, []byte(cfg), 0o600)
}
