package shop

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/pki"
)

func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func etcdClient(t *testing.T, endpoint string, f services.TLSFiles) *clientv3.Client {
	t.Helper()
	tc, err := transport.TLSInfo{CertFile: f.CertFile, KeyFile: f.KeyFile, TrustedCAFile: f.CAFile}.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, TLS: tc, DialTimeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// An embedded etcd with TLS and users: only the grid's certificates get in,
// and only to the grid's keys (the audit registered a fake plant through an
// open etcd).
func TestEmbeddedEtcdTLSAndAuth(t *testing.T) {
	dir := t.TempDir()
	certs := pki.Dir(filepath.Join(dir, "pki"))
	if err := pki.Ensure(certs, []string{"127.0.0.1"}, "etcd", "root", "shop", "plant", "intruder"); err != nil {
		t.Fatal(err)
	}
	cfg := EtcdServerConfig{Dir: filepath.Join(dir, "etcd"), ClientAddr: freeLoopbackAddr(t), PeerAddr: freeLoopbackAddr(t),
		NoFsync: true, TLS: certs.TLS("etcd"), Users: []string{"shop"}, Root: certs.TLS("root")}
	e, err := StartEtcdServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	shopCli := etcdClient(t, e.Endpoint, certs.TLS("shop"))
	if _, err := shopCli.Put(ctx, KeyPrefix+"x", "1"); err != nil {
		t.Fatalf("the shop writes the grid's keys: %v", err)
	}
	if _, err := shopCli.Put(ctx, "/elsewhere", "1"); err == nil {
		t.Fatal("the shop wrote outside the grid's prefix")
	}
	// A certificate from the CA that names no etcd user, and no certificate.
	intr := etcdClient(t, e.Endpoint, certs.TLS("intruder"))
	if _, err := intr.Put(ctx, KeyPrefix+"plants/fake", "bid -1e9"); err == nil {
		t.Fatal("a certificate of no etcd user wrote a key")
	}
	anon := etcdClient(t, e.Endpoint, services.TLSFiles{CAFile: certs.CA()})
	actx, acancel := context.WithTimeout(ctx, 3*time.Second)
	if _, err := anon.Put(actx, KeyPrefix+"plants/fake", "x"); err == nil {
		t.Fatal("a client without a certificate wrote a key")
	}
	acancel()
	// Restarted with one more user: setup is idempotent.
	e.Close()
	cfg.Users = append(cfg.Users, "plant")
	e, err = StartEtcdServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if _, err := etcdClient(t, e.Endpoint, certs.TLS("plant")).Put(ctx, KeyPrefix+"plants/p1", "1"); err != nil {
		t.Fatalf("a user added on restart: %v", err)
	}
	if r, err := etcdClient(t, e.Endpoint, certs.TLS("shop")).Get(ctx, KeyPrefix+"x"); err != nil || len(r.Kvs) != 1 {
		t.Fatalf("data kept across the restart: %v %v", r, err)
	}
}
