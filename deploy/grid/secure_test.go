package grid

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/pki"
	"github.com/vmgrid/vmgrid/shop/market"
)

func needRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("plants mount FUSE views: needs root")
	}
}

// healthCheck calls the health service of addr, dialled with tlsFiles.
func healthCheck(ctx context.Context, addr string, tlsFiles services.TLSFiles) error {
	cc, err := services.Dial(addr, tlsFiles)
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

// etcdPut writes a fake plant into the registry with a client of endpoint
// using tlsFiles (none: plaintext).
func etcdPut(ctx context.Context, t *testing.T, endpoint string, tlsFiles services.TLSFiles) error {
	t.Helper()
	c := services.EtcdConfig{Endpoints: []string{endpoint}, TLS: tlsFiles, DialTimeout: 2 * time.Second}
	cli, err := c.New(zap.NewNop())
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	_, err = cli.Put(ctx, market.PlantsPrefix+"intruder", `{"name":"intruder","addr":"127.0.0.1:1"}`)
	return err
}

// Issue 15 items 12 and 3: `vmgrid up` serves every gRPC port with mutual
// TLS only, and its etcd lets in only the shop's and plants' certificates:
// someone who can reach etcd cannot register a plant.
func TestUpIsSecure(t *testing.T) {
	needRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g, err := Up(ctx, Config{Dir: testutil.ShortTempDir(t), Plants: 1, NoFsync: true, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	addrs := map[string]string{"shop": g.Shop.Addr(), "imageserver": g.Images.Addr(), "dataserver": g.Data.Addr(), "plant0": g.Plants[0].Addr()}
	for name, addr := range addrs {
		if err := healthCheck(ctx, addr, services.TLSFiles{}); err == nil {
			t.Errorf("%s answers in plaintext", name)
		}
		if err := healthCheck(ctx, addr, services.TLSFiles{CAFile: g.PKI.CA()}); err == nil {
			t.Errorf("%s answers a TLS client without a certificate", name)
		}
		if err := healthCheck(ctx, addr, g.ClientTLS); err != nil {
			t.Errorf("%s with the client certificate: %v", name, err)
		}
	}

	if !strings.HasPrefix(g.Etcd.Endpoint, "https://") {
		t.Fatalf("etcd serves %s", g.Etcd.Endpoint)
	}
	if err := etcdPut(ctx, t, "http://"+strings.TrimPrefix(g.Etcd.Endpoint, "https://"), services.TLSFiles{}); err == nil {
		t.Error("a plaintext etcd client registered a plant")
	}
	if err := etcdPut(ctx, t, g.Etcd.Endpoint, services.TLSFiles{CAFile: g.PKI.CA()}); err == nil {
		t.Error("an etcd client without a certificate registered a plant")
	}
	// Certificates of the grid's CA that name no etcd user: the CLI's, and
	// one made for the occasion.
	if err := pki.Ensure(g.PKI, []string{"127.0.0.1"}, "intruder"); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"intruder", clientName} {
		if err := etcdPut(ctx, t, g.Etcd.Endpoint, g.PKI.TLS(name)); err == nil {
			t.Errorf("an etcd client with the certificate of %s registered a plant", name)
		}
	}
	// The plant itself is in: it registered with its certificate.
	cli, err := g.etcdConfig("shop").New(zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	r, err := cli.Get(ctx, market.PlantsPrefix, clientv3.WithPrefix())
	if err != nil || len(r.Kvs) != 1 || !strings.HasSuffix(string(r.Kvs[0].Key), "plant0") {
		t.Fatalf("registry through the shop's identity: %v %v", r, err)
	}
}

// A VM created through the shop of a secure grid runs: the shop reaches
// etcd, the plants and the image server over mutual TLS, the plant its
// upstream.
func TestUpSecureVM(t *testing.T) {
	needRoot(t)
	testutil.NeedQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	g, err := Up(ctx, Config{Dir: testutil.ShortTempDir(t), Plants: 1, Golden: "tiny", AgentPath: testutil.GuestAgent(t), NoFsync: true, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	cc, err := services.Dial(g.Shop.Addr(), g.ClientTLS, grpc.WithPerRPCCredentials(auth.Credentials{Token: g.Token}))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	shop := shopv1.NewShopServiceClient(cc)
	stream, err := shop.CreateVM(ctx, &shopv1.CreateVMRequest{RequestId: "secure1"})
	if err != nil {
		t.Fatal(err)
	}
	var ad *computev1.ClassAd
	for ad == nil {
		p, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		ad = p.Classad
	}
	if ad.State != computev1.VMState_VM_STATE_RUNNING {
		t.Fatalf("classad %+v", ad)
	}
	if _, err := shop.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: ad.VmId}); err != nil {
		t.Fatal(err)
	}
}

// A directory that held a secure grid does not start an insecure one: its
// etcd would refuse every plaintext client.
func TestUpInsecureRefusesSecureDir(t *testing.T) {
	dir := testutil.ShortTempDir(t)
	if err := os.MkdirAll(dir+"/pki", 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := Up(context.Background(), Config{Dir: dir, Insecure: true, NoFsync: true, Logger: zaptest.NewLogger(t)}); err == nil || !strings.Contains(err.Error(), "secure grid") {
		t.Fatalf("insecure grid in a secure grid's directory: %v", err)
	}
}
