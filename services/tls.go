package services

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
)

// TLSFiles names PEM files. For a server: CertFile and KeyFile, and CAFile to
// require client certificates (mutual TLS). For a client: CAFile to trust the
// server, and CertFile/KeyFile to present a client certificate.
type TLSFiles struct {
	CertFile   string
	KeyFile    string
	CAFile     string
	ServerName string // client only: overrides the name checked in the certificate
}

// Enabled reports whether any TLS file is set.
func (t TLSFiles) Enabled() bool { return t.CertFile != "" || t.KeyFile != "" || t.CAFile != "" }

func (t TLSFiles) serverConfig() (*tls.Config, error) {
	if t.CertFile == "" || t.KeyFile == "" {
		return nil, fmt.Errorf("tls: a server needs both a certificate and a key file")
	}
	cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if t.CAFile != "" {
		pool, err := loadPool(t.CAFile)
		if err != nil {
			return nil, err
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

func (t TLSFiles) clientConfig() (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	if t.CAFile != "" {
		pool, err := loadPool(t.CAFile)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = pool
	}
	if t.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

func loadPool(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("tls: no certificate found in %s", file)
	}
	return pool, nil
}

// HTTPSConfig is a server configuration for HTTPS that browsers and curl
// use: the certificate, and no client certificate (HTTP callers
// authenticate with bearer tokens). Nil without a certificate.
func (t TLSFiles) HTTPSConfig() (*tls.Config, error) {
	if t.CertFile == "" {
		return nil, nil
	}
	return TLSFiles{CertFile: t.CertFile, KeyFile: t.KeyFile}.serverConfig()
}

// ClientConfig is the client side of t (the CA to trust, a client
// certificate), for HTTP clients of vmgrid's HTTPS endpoints.
func (t TLSFiles) ClientConfig() (*tls.Config, error) { return t.clientConfig() }
