package shop

import (
	"context"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/market"
)

// The shop's own tests run it against a real embedded etcd (which they stop
// and start again), with a fake image server and fake plants: gRPC servers
// that bid through the real market and keep VMs in a map.

const (
	ownerToken    = "demo-token-0001"
	operatorToken = "ops-token-00001"
)

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// testEtcd is an embedded etcd that can be stopped and started again on the
// same directory and ports.
type testEtcd struct {
	t                  testing.TB
	dir, client, peers string
	e                  *EmbeddedEtcd
}

func startTestEtcd(t testing.TB) *testEtcd {
	te := &testEtcd{t: t, dir: t.TempDir(), client: freeAddr(t), peers: freeAddr(t)}
	te.start()
	t.Cleanup(te.stop)
	return te
}

func (te *testEtcd) start() {
	e, err := StartEtcd(te.dir, te.client, te.peers, true, nil)
	if err != nil {
		te.t.Fatal(err)
	}
	te.e = e
}

func (te *testEtcd) stop() {
	if te.e != nil {
		te.e.Close()
		te.e = nil
	}
}

func (te *testEtcd) newClient() *clientv3.Client {
	cli, err := clientv3.New(market.ClientConfig([]string{"http://" + te.client}, zap.NewNop()))
	if err != nil {
		te.t.Fatal(err)
	}
	te.t.Cleanup(func() { cli.Close() })
	return cli
}

// serve runs a gRPC server on addr ("": a free port) until the test ends or
// stop is called.
func serve(t testing.TB, addr string, register func(*grpc.Server)) (string, func()) {
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(services.KeepaliveOptions()...) // the shop dials with services.Dial
	register(gs)
	go gs.Serve(l)
	var once sync.Once
	stop := func() { once.Do(gs.Stop) }
	t.Cleanup(stop)
	return l.Addr().String(), stop
}

// fakeImages serves one golden image, "tiny".
type fakeImages struct {
	imagev1.UnimplementedImageServiceServer
}

func (fakeImages) ListImages(context.Context, *imagev1.ListImagesRequest) (*imagev1.ListImagesResponse, error) {
	return &imagev1.ListImagesResponse{Images: []*imagev1.Manifest{{
		Name:       "tiny",
		Attributes: &imagev1.ImageAttributes{Arch: "x86_64", Vcpus: 1, MemoryMib: 256},
		Files:      []*imagev1.FileMeta{{Name: "vm.json"}},
	}}}, nil
}

// fakePlant is a plant's PlantService over a map of VMs.
type fakePlant struct {
	computev1.UnimplementedPlantServiceServer
	name string

	mu      sync.Mutex
	vms     map[string]bool
	creates int
	// last is the last CreateVM and the authorization header it came with.
	last     *computev1.CreateVMRequest
	lastAuth string
	// srv, when set, is served instead (a fake with more RPCs over this one).
	srv computev1.PlantServiceServer
	// draining is posted in the registration (drain_test.go).
	draining atomic.Bool
}

func (p *fakePlant) CreateVM(req *computev1.CreateVMRequest, stream computev1.PlantService_CreateVMServer) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	p.mu.Lock()
	p.vms[req.VmId] = true
	p.creates++
	p.last, p.lastAuth = req, strings.Join(md.Get("authorization"), ",")
	p.mu.Unlock()
	return stream.Send(&computev1.CreateVMProgress{Classad: &computev1.ClassAd{VmId: req.VmId, Owner: req.Owner, Image: req.Image,
		Plant: p.name, State: computev1.VMState_VM_STATE_RUNNING, Labels: req.Labels}})
}

func (p *fakePlant) GetVM(_ context.Context, req *computev1.GetVMRequest) (*computev1.ClassAd, error) {
	if !p.has(req.VmId) {
		return nil, status.Error(codes.NotFound, "no such vm")
	}
	return &computev1.ClassAd{VmId: req.VmId, Plant: p.name, State: computev1.VMState_VM_STATE_RUNNING}, nil
}

func (p *fakePlant) DestroyVM(_ context.Context, req *computev1.DestroyVMRequest) (*computev1.DestroyVMResponse, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.vms[req.VmId] {
		return nil, status.Error(codes.NotFound, "no such vm")
	}
	delete(p.vms, req.VmId)
	return &computev1.DestroyVMResponse{}, nil
}

func (p *fakePlant) has(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.vms[id]
}

func (p *fakePlant) created() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.creates
}

// plantProcess is a fake plant's life: its server and its place in the
// market, as computeserver's joinMarket makes it.
type plantProcess struct {
	addr       string
	stopServer func()
	cli        *clientv3.Client
	leave      func()
}

// runPlant serves p on addr ("": a free port) and joins the market with a
// session of ttl seconds.
func runPlant(t *testing.T, te *testEtcd, p *fakePlant, addr string, ttl int) *plantProcess {
	var srv computev1.PlantServiceServer = p
	if p.srv != nil {
		srv = p.srv
	}
	addr, stop := serve(t, addr, func(gs *grpc.Server) { computev1.RegisterPlantServiceServer(gs, srv) })
	cli := te.newClient()
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(ttl))
	if err != nil {
		t.Fatal(err)
	}
	info := func() market.PlantInfo {
		return market.PlantInfo{Name: p.name, Addr: addr, Arch: "x86_64", MemoryMiB: 4096, MemoryFreeMiB: 4096, Draining: p.draining.Load()}
	}
	ctx, cancel := context.WithCancel(context.Background())
	log := zaptest.NewLogger(t).Named(p.name)
	bidding, err := market.StartBidder(ctx, cli, p.name, func(a market.Auction) market.Bid { return market.Quote(market.DefaultWeights(), info(), a) }, log)
	if err != nil {
		t.Fatal(err)
	}
	registered, err := market.Register(ctx, sess, info, 100*time.Millisecond, log)
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	pp := &plantProcess{addr: addr, stopServer: stop, cli: cli, leave: func() {
		once.Do(func() { cancel(); <-bidding; <-registered; sess.Close() })
	}}
	t.Cleanup(pp.leave)
	return pp
}

// die is a plant killed: no server, no keepalives (its lease lapses).
func (pp *plantProcess) die() {
	pp.stopServer()
	pp.cli.Close()
}

// testShop is a shop served over gRPC with token authentication.
type testShop struct {
	shop   *Shop
	client shopv1.ShopServiceClient
	addr   string
}

func startTestShop(t *testing.T, te *testEtcd, cfg Config) *testShop {
	return startTestShopWith(t, te, cfg, fakeImages{})
}

// startTestShopWith is startTestShop over another fake image server.
func startTestShopWith(t *testing.T, te *testEtcd, cfg Config, images imagev1.ImageServiceServer) *testShop {
	imagesAddr, _ := serve(t, "", func(gs *grpc.Server) { imagev1.RegisterImageServiceServer(gs, images) })
	cc, err := services.Dial(imagesAddr, services.TLSFiles{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	tokens := &auth.Tokens{}
	if err := tokens.Add(ownerToken, "demo"); err != nil {
		t.Fatal(err)
	}
	if err := tokens.AddRole(operatorToken, "ops", auth.RoleOperator); err != nil {
		t.Fatal(err)
	}
	cfg.Etcd, cfg.Images, cfg.Logger = te.newClient(), imageclient.NewClient(cc), zaptest.NewLogger(t).Named("shop")
	ts := &testShop{}
	a := &auth.Authenticator{Tokens: tokens, Policy: auth.ShopPolicy()}
	srv, err := services.NewServer(services.Options{Name: "shop", Listen: "127.0.0.1:0", Logger: zap.NewNop(),
		UnaryInterceptors:  []grpc.UnaryServerInterceptor{a.UnaryServerInterceptor()},
		StreamInterceptors: []grpc.StreamServerInterceptor{a.StreamServerInterceptor()},
	}, func(gs *grpc.Server, reg prometheus.Registerer) error {
		var err error
		if ts.shop, err = New(cfg, reg); err == nil {
			shopv1.RegisterShopServiceServer(gs, ts.shop)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done; ts.shop.Close() })
	scc, err := services.Dial(srv.Addr(), services.TLSFiles{}, grpc.WithPerRPCCredentials(auth.Credentials{Token: ownerToken, Insecure: true}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { scc.Close() })
	ts.client, ts.addr = shopv1.NewShopServiceClient(scc), srv.Addr()
	return ts
}

func (ts *testShop) create(ctx context.Context, req *shopv1.CreateVMRequest) (*computev1.ClassAd, error) {
	stream, err := ts.client.CreateVM(ctx, req)
	if err != nil {
		return nil, err
	}
	return untilClassAd(stream.Recv, func(*shopv1.CreateVMProgress) {})
}

func codeOf(err error) codes.Code { return errdefs.Code(err) }

// eventually retries f every 200 ms until it is true or d passed.
func eventually(t *testing.T, d time.Duration, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
