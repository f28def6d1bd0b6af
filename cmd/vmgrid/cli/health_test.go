package cli

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/vmgrid/vmgrid/services/pki"
)

// vmgrid health: SERVING exits 0, any other status and an unreachable
// server exit 1 with one line, within --timeout.
func TestHealthCommand(t *testing.T) {
	clearEnv(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	h := health.NewServer()
	healthpb.RegisterHealthServer(s, h)
	go s.Serve(l) //nolint:errcheck
	defer s.Stop()
	addr := l.Addr().String()
	if code, out, stderr := runCLI(t, "health", addr); code != 0 || out != "SERVING\n" {
		t.Fatalf("serving: exit %d, %q %q", code, out, stderr)
	}
	h.SetServingStatus("vmgrid.x.v1.X", healthpb.HealthCheckResponse_NOT_SERVING)
	if code, _, stderr := runCLI(t, "health", addr, "--service", "vmgrid.x.v1.X"); code != 1 || !strings.Contains(stderr, "NOT_SERVING") {
		t.Fatalf("not serving: exit %d, %q", code, stderr)
	}
	s.Stop()
	start := time.Now()
	if code, _, stderr := runCLI(t, "health", addr, "--timeout", "1s"); code != 1 || strings.Count(stderr, "\n") != 1 || time.Since(start) > 5*time.Second {
		t.Fatalf("gone: exit %d after %s, %q", code, time.Since(start), stderr)
	}
}

// Three `vmgrid etcd` members make one cluster over TLS (peers too): each
// answers vmgrid health, a write through one is read through another with
// the shop's certificate, and with one member stopped the others still
// take writes.
func TestEtcdCluster(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	certs := filepath.Join(dir, "pki")
	if code, _, stderr := runCLI(t, "certs", "--dir", certs, "--hosts", "127.0.0.1", "etcd1", "etcd2", "etcd3", "root", "shop", "client"); code != 0 {
		t.Fatal(stderr)
	}
	d := pki.Dir(certs)
	var clients, peers, cluster []string
	for i := range 3 {
		clients, peers = append(clients, freeAddr(t)), append(peers, freeAddr(t))
		cluster = append(cluster, fmt.Sprintf("etcd%d=https://%s", i+1, peers[i]))
	}
	var stops []context.CancelFunc
	var wg sync.WaitGroup
	defer wg.Wait()
	lines := make(chan string, 3)
	for i := range 3 {
		ctx, cancel := context.WithCancel(context.Background())
		stops = append(stops, cancel)
		defer cancel()
		name := fmt.Sprintf("etcd%d", i+1)
		pr, pw := io.Pipe()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer pw.Close()
			run(ctx, []string{"etcd", "--name", name, "--data-dir", filepath.Join(dir, name), "--listen-client", clients[i], "--listen-peer", peers[i],
				"--initial-cluster", strings.Join(cluster, ","), "--tls-cert", d.TLS(name).CertFile, "--tls-key", d.TLS(name).KeyFile, "--tls-ca", d.CA(),
				"--users", "shop", "--root-cert", d.TLS("root").CertFile, "--root-key", d.TLS("root").KeyFile, "--unsafe-no-fsync", "--log-level", "error"}, pw, io.Discard)
		}()
		go func() {
			line, _ := bufio.NewReader(pr).ReadString('\n')
			lines <- line
			io.Copy(io.Discard, pr) //nolint:errcheck
		}()
	}
	for range 3 {
		select {
		case line := <-lines:
			if !strings.HasPrefix(line, "etcd is serving clients at https://") {
				t.Fatalf("a member: %q", line)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("the cluster did not come up")
		}
	}
	tls := []string{"--tls-ca", d.CA(), "--tls-cert", d.TLS("client").CertFile, "--tls-key", d.TLS("client").KeyFile}
	for _, c := range clients {
		if code, out, stderr := runCLI(t, append([]string{"health", c}, tls...)...); code != 0 || out != "SERVING\n" {
			t.Fatalf("health %s: exit %d, %q %q", c, code, out, stderr)
		}
	}
	if err := etcdPut("https://"+clients[0], d.TLS("shop")); err != nil {
		t.Fatalf("put through member 1: %v", err)
	}
	stops[2]()
	if code, _, _ := runCLI(t, append([]string{"health", clients[2], "--timeout", "1s"}, tls...)...); code != 1 {
		t.Fatal("a stopped member answered its health check")
	}
	if err := etcdPut("https://"+clients[1], d.TLS("shop")); err != nil {
		t.Fatalf("put through member 2 with member 3 stopped: %v", err)
	}
}
