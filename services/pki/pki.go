// Package pki makes the certificate authority and the certificates a grid's
// services use for mutual TLS (between each other and to etcd). `vmgrid up`
// calls Ensure for its secure default; operators of a deployed grid may use
// it (through `vmgrid up`'s directory layout) or bring their own PKI.
//
// Layout in a directory: ca.pem and ca-key.pem (the authority), and for
// every name NAME.pem and NAME-key.pem, a certificate valid both as a server
// and as a client (every vmgrid service is both), for the hosts given.
// Existing files are kept, so a restarted grid keeps its identities; keys
// are written 0600 through a temporary file and a rename.
package pki

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
	"path/filepath"
	"time"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/fsutil"
)

// Lifetimes of what Ensure makes.
const (
	CALifetime   = 10 * 365 * 24 * time.Hour
	LeafLifetime = 2 * 365 * 24 * time.Hour
)

// Dir is a directory holding a CA and certificates.
type Dir string

// CA is the authority's certificate file.
func (d Dir) CA() string { return filepath.Join(string(d), "ca.pem") }

// TLS returns the files of name: its certificate and key, and the CA to
// verify peers with (which also makes servers require client certificates).
func (d Dir) TLS(name string) services.TLSFiles {
	return services.TLSFiles{
		CertFile: filepath.Join(string(d), name+".pem"),
		KeyFile:  filepath.Join(string(d), name+"-key.pem"),
		CAFile:   d.CA(),
	}
}

// Ensure makes the CA (when missing) and a certificate for every name
// (when missing), each valid for hosts (IP addresses or DNS names) and its
// own name.
func Ensure(d Dir, hosts []string, names ...string) error {
	if err := os.MkdirAll(string(d), 0o700); err != nil {
		return err
	}
	ca, caKey, err := ensureCA(d)
	if err != nil {
		return err
	}
	for _, n := range names {
		f := d.TLS(n)
		if exists(f.CertFile) && exists(f.KeyFile) {
			continue
		}
		if err := issue(f, n, hosts, ca, caKey); err != nil {
			return fmt.Errorf("pki: certificate for %s: %w", n, err)
		}
	}
	return nil
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

func ensureCA(d Dir) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certFile, keyFile := d.CA(), filepath.Join(string(d), "ca-key.pem")
	if exists(certFile) && exists(keyFile) {
		return loadCA(certFile, keyFile)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl, err := template("vmgrid CA", CALifetime)
	if err != nil {
		return nil, nil, err
	}
	tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	if err := writePair(certFile, keyFile, der, key); err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	return cert, key, err
}

func loadCA(certFile, keyFile string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cb, err := readPEM(certFile, "CERTIFICATE")
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(cb)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: %s: %w", certFile, err)
	}
	kb, err := readPEM(keyFile, "EC PRIVATE KEY")
	if err != nil {
		return nil, nil, err
	}
	key, err := x509.ParseECPrivateKey(kb)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: %s: %w", keyFile, err)
	}
	return cert, key, nil
}

func readPEM(path, typ string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != typ {
		return nil, fmt.Errorf("pki: %s holds no %s", path, typ)
	}
	return blk.Bytes, nil
}

func template(cn string, life time.Duration) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"vmgrid"}},
		NotBefore:    now.Add(-time.Hour), // tolerate clocks a little behind
		NotAfter:     now.Add(life),
	}, nil
}

func issue(f services.TLSFiles, name string, hosts []string, ca *x509.Certificate, caKey *ecdsa.PrivateKey) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl, err := template(name, LeafLifetime)
	if err != nil {
		return err
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	for _, h := range append([]string{name}, hosts...) {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	return writePair(f.CertFile, f.KeyFile, der, key)
}

func writePair(certFile, keyFile string, der []byte, key *ecdsa.PrivateKey) error {
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	// The key first: a certificate on disk always has its key beside it.
	// The directory is 0700, so the key is private before its chmod too.
	if err := fsutil.WriteFileAtomic(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})); err != nil {
		return fmt.Errorf("pki: writing key: %w", err)
	}
	if err := os.Chmod(keyFile, 0o600); err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}
