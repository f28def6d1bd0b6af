package pki

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"testing"
	"time"
)

func TestEnsureMakesMutualTLS(t *testing.T) {
	d := Dir(t.TempDir())
	if err := Ensure(d, []string{"127.0.0.1", "localhost"}, "shop", "plant"); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(d.TLS("shop").CertFile)
	// Idempotent: a second call keeps what is there and adds what is not.
	if err := Ensure(d, []string{"127.0.0.1"}, "shop", "etcd"); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(d.TLS("shop").CertFile)
	if string(before) != string(after) {
		t.Fatal("Ensure replaced an existing certificate")
	}
	if st, err := os.Stat(d.TLS("plant").KeyFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode: %v %v", st.Mode(), err)
	}
	pool := x509.NewCertPool()
	ca, _ := os.ReadFile(d.CA())
	pool.AppendCertsFromPEM(ca)
	srvCert, err := tls.LoadX509KeyPair(d.TLS("etcd").CertFile, d.TLS("etcd").KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	cliCert, err := tls.LoadX509KeyPair(d.TLS("plant").CertFile, d.TLS("plant").KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{srvCert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			if c.(*tls.Conn).Handshake() == nil {
				c.Write([]byte("ok"))
			}
			c.Close()
		}
	}()
	c, err := (&tls.Dialer{Config: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cliCert}}}).DialContext(context.Background(), "tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2)
	if _, err := c.Read(buf); err != nil || string(buf) != "ok" {
		t.Fatalf("mutual TLS: %q %v", buf, err)
	}
	c.Close()
	// A client without a certificate is refused.
	c2, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", l.Addr().String(), &tls.Config{RootCAs: pool})
	if err == nil {
		_, err = c2.Read(buf)
		c2.Close()
	}
	if err == nil {
		t.Fatal("a client without a certificate got in")
	}
}
