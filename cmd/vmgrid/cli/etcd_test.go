package cli

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/pki"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// etcdPut writes a key into the etcd at endpoint as the client of tlsFiles.
func etcdPut(endpoint string, tlsFiles services.TLSFiles) error {
	cli, err := services.EtcdConfig{Endpoints: []string{endpoint}, TLS: tlsFiles, DialTimeout: 2 * time.Second}.New(zap.NewNop())
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, err = cli.Put(ctx, "/vmgrid/plants/p", "x")
	return err
}

// `vmgrid certs` then `vmgrid etcd` as a deployment runs them: the etcd
// serves the users' certificates only and stops cleanly on SIGTERM.
func TestEtcdCommand(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	certs := filepath.Join(dir, "pki")
	code, out, stderr := runCLI(t, "certs", "--dir", certs, "--hosts", "127.0.0.1", "etcd", "root", "shop", "intruder")
	if code != 0 || !strings.Contains(out, "shop: "+filepath.Join(certs, "shop.pem")) {
		t.Fatalf("certs: exit %d, %s %s", code, out, stderr)
	}
	d := pki.Dir(certs)
	if code, _, stderr := runCLI(t, "etcd", "--users", "shop"); code == 0 || !strings.Contains(stderr, "--root-cert") {
		t.Fatalf("--users without a root certificate: exit %d, %s", code, stderr)
	}

	// Main's context: it ends on SIGTERM.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	client := freeAddr(t)
	// stdout is a pipe: its first line says etcd serves (with its users).
	pr, pw := io.Pipe()
	var errw bytes.Buffer // read once run is done
	done := make(chan int, 1)
	go func() {
		defer pw.Close()
		done <- run(ctx, []string{"etcd", "--data-dir", filepath.Join(dir, "etcd"), "--listen-client", client, "--listen-peer", freeAddr(t),
			"--tls-cert", d.TLS("etcd").CertFile, "--tls-key", d.TLS("etcd").KeyFile, "--tls-ca", d.CA(),
			"--users", "shop", "--root-cert", d.TLS("root").CertFile, "--root-key", d.TLS("root").KeyFile, "--unsafe-no-fsync", "--log-level", "error"}, pw, &errw)
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	go io.Copy(io.Discard, pr) //nolint:errcheck
	endpoint := "https://" + client
	if err != nil || !strings.HasPrefix(line, "etcd is serving clients at "+endpoint) {
		t.Fatalf("vmgrid etcd: %q %v (exit %d: %s)", line, err, <-done, errw.String())
	}
	if err := etcdPut(endpoint, d.TLS("shop")); err != nil {
		t.Fatalf("the shop's certificate: %v", err)
	}
	if err := etcdPut(endpoint, d.TLS("intruder")); err == nil {
		t.Error("a certificate of no etcd user wrote a key")
	}
	if err := etcdPut(endpoint, services.TLSFiles{CAFile: d.CA()}); err == nil {
		t.Error("a client without a certificate wrote a key")
	}
	if err := etcdPut("http://"+client, services.TLSFiles{}); err == nil {
		t.Error("a plaintext client wrote a key")
	}

	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("vmgrid etcd exited %d on SIGTERM: %s", code, errw.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("vmgrid etcd did not stop on SIGTERM")
	}
	if c, err := net.Dial("tcp", client); err == nil {
		c.Close()
		t.Fatal("etcd still listens after stopping")
	}
}
