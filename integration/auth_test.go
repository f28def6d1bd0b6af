package integration

import (
	"context"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/dataserver"
	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	"github.com/vmgrid/vmgrid/deploy/grid"
	"github.com/vmgrid/vmgrid/imageserver"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/authprobe"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/shop"
)

// Issue 15 item 2: with no token, the audit ran a root shell in another
// owner's VM (ExecVM), killed it (DestroyVM), created VMs as anyone, dropped
// caches, deleted images and overwrote persistent disks. These tests start
// every role with its real Start, as `vmgrid up` does, and call every RPC
// each one serves as an outsider.

// authGrid is a grid (etcd, image server, data server, one plant, shop;
// no golden image, so no QEMU) and a cache proxy in front of its image
// server, each started with its real Start and the grid's tokens.
type authGrid struct {
	*grid.Grid
	proxy *computeserver.CacheProxy
}

func startAuthGrid(t *testing.T) *authGrid {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the plant mounts a FUSE view: needs root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g, err := grid.Up(ctx, grid.Config{Dir: testutil.ShortTempDir(t), Plants: 1, NoFsync: true, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	// The grid speaks mutual TLS; the probes present the grid's client
	// certificate, so what refuses them is the tokens check.
	gridTLS = g.ClientTLS
	cp, err := computeserver.StartCacheProxy(ctx, computeserver.CacheProxyConfig{
		Server:   services.Options{Name: "cacheproxy", Listen: "127.0.0.1:0", ShutdownTimeout: 5 * time.Second, TLS: g.ClientTLS},
		Upstream: g.Images.Addr(), UpstreamTLS: g.ClientTLS, DataDir: t.TempDir(), TokensFile: g.TokensFile, ServiceTokenFile: g.ServiceTokenFile,
	})
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { cp.Serve(sctx); close(done) }()
	t.Cleanup(func() { stop(); <-done })
	return &authGrid{Grid: g, proxy: cp}
}

// gridTLS is the client certificate of the grid under test.
var gridTLS services.TLSFiles

// conn dials addr sending no token (the probe adds its own header).
func conn(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := services.Dial(addr, gridTLS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// asCaller dials addr as token (services.Dial: errors carry codes).
func asCaller(t *testing.T, addr, token string) *grpc.ClientConn {
	t.Helper()
	cc, err := services.Dial(addr, gridTLS, services.WithToken(token, gridTLS))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// imageWrites are the image API's methods an owner may not call.
var imageWrites = []string{"Publish", "DeleteImage", "CreateDisk", "WriteBlocks", "PutProfile"}

// probeCase is one kind of outsider against one role.
type probeCase struct {
	who   string
	token string // the authorization header's value ("" sends none)
	want  codes.Code
	descs []grpc.ServiceDesc
}

func TestEveryRoleRefusesOutsiders(t *testing.T) {
	g := startAuthGrid(t)
	ctx := context.Background()
	roles := []struct {
		name string
		srv  *services.Server
		// extra are the callers this role must refuse beyond no token and a
		// wrong one, by the methods they may not call.
		extra func(all []grpc.ServiceDesc) []probeCase
	}{
		{"image server", g.Images.Server, func(all []grpc.ServiceDesc) []probeCase {
			return []probeCase{{"an owner on the write RPCs", "Bearer " + g.Token, codes.PermissionDenied, []grpc.ServiceDesc{authprobe.Only(imagev1.ImageService_ServiceDesc, imageWrites...)}}}
		}},
		{"compute server", g.Plants[0].Server, func(all []grpc.ServiceDesc) []probeCase {
			return []probeCase{{"an owner", "Bearer " + g.Token, codes.PermissionDenied, all}}
		}},
		{"cache proxy", g.proxy.Server, func(all []grpc.ServiceDesc) []probeCase {
			return []probeCase{{"an owner on the write RPCs", "Bearer " + g.Token, codes.PermissionDenied,
				[]grpc.ServiceDesc{authprobe.Only(imagev1.ImageService_ServiceDesc, imageWrites...)}}}
		}},
		{"data server", g.Data.Server, func(all []grpc.ServiceDesc) []probeCase {
			return []probeCase{{"the services' token", "Bearer " + g.ServiceToken, codes.PermissionDenied, all}}
		}},
		{"shop", g.Shop.Server, func(all []grpc.ServiceDesc) []probeCase {
			// A service token does not act for owners at the shop.
			return []probeCase{{"the services' token", "Bearer " + g.ServiceToken, codes.PermissionDenied, all}}
		}},
	}
	total, refused := 0, 0
	for _, r := range roles {
		all := authprobe.Served(r.srv.GRPC.GetServiceInfo())
		cc := conn(t, r.srv.Addr())
		cases := append([]probeCase{
			{"no token", "", codes.Unauthenticated, all},
			{"a wrong token", "Bearer not-a-token-of-this-grid", codes.Unauthenticated, all},
			{"a forged task credential", "Bearer vmgt1.e30.AAAA", codes.Unauthenticated, all},
		}, r.extra(all)...)
		for _, c := range cases {
			res := authprobe.Probe(ctx, cc, c.token, []codes.Code{c.want}, 5*time.Second, c.descs...)
			total += res.Total
			refused += res.Refused
			t.Logf("%s, %s: %d of %d RPCs refused (%s)", r.name, c.who, res.Refused, res.Total, c.want)
			if res.Total == 0 || res.Refused != res.Total {
				t.Errorf("%s, %s: admitted %v", r.name, c.who, res.Admitted)
			}
		}
	}
	t.Logf("all roles: %d of %d RPCs refused", refused, total)
}

// recorder is a TCP listener that records whether anything connected.
func recorder(t *testing.T) (addr string, connections *atomic.Int32) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	connections = &atomic.Int32{}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			connections.Add(1)
			c.Close()
		}
	}()
	return l.Addr().String(), connections
}

func stageInTo(dataserver string) *computev1.ConfigDAG {
	return &computev1.ConfigDAG{Actions: []*computev1.Action{{Id: "in", Kind: &computev1.Action_StageIn{
		StageIn: &computev1.StageInAction{Dataserver: dataserver, Files: []string{"secret.txt"}}}}}}
}

func createErr(ctx context.Context, open func() (interface{ Recv() error }, error)) error {
	s, err := open()
	if err != nil {
		return err
	}
	for {
		if err := s.Recv(); err != nil {
			return err
		}
	}
}

// Issue 15 item 1: a CreateVM whose stage_in named a data server of the
// user's made the plant send its service token there. Now neither the shop
// nor a plant dials a data server a request names, and a task credential
// opens one owner's files for one task only.
func TestCredentialsStayInTheGrid(t *testing.T) {
	g := startAuthGrid(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	evil, seen := recorder(t)

	shopc := shopv1.NewShopServiceClient(asCaller(t, g.Shop.Addr(), g.Token))
	err := createErr(ctx, func() (interface{ Recv() error }, error) {
		s, err := shopc.CreateVM(ctx, &shopv1.CreateVMRequest{RequestId: "exfil", Config: stageInTo(evil)})
		return recvOnly[*shopv1.CreateVMProgress]{s}, err
	})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "stage_in.dataserver") {
		t.Fatalf("a CreateVM through the shop naming a data server: %v", err)
	}
	plantCC := asCaller(t, g.Plants[0].Addr(), g.ServiceToken) // as the shop
	plants := computev1.NewPlantServiceClient(plantCC)
	err = createErr(ctx, func() (interface{ Recv() error }, error) {
		s, err := plants.CreateVM(ctx, &computev1.CreateVMRequest{VmId: "vm-exfil", Owner: "demo", Config: stageInTo(evil), DataCredential: "x"})
		return recvOnly[*computev1.CreateVMProgress]{s}, err
	})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a CreateVM at the plant naming a data server: %v", err)
	}
	time.Sleep(200 * time.Millisecond)
	if n := seen.Load(); n != 0 {
		t.Fatalf("the user's listener got %d connections", n)
	}

	// A task credential reads its owner's files and writes its task's
	// outputs, nothing of anyone else's.
	demo := dataAs(t, g.Data.Addr(), g.Token)
	if _, err := demo.UploadReader(ctx, strings.NewReader("demo's secret"), -1, "secret.txt", nil); err != nil {
		t.Fatal(err)
	}
	key, err := auth.LoadTaskKey(g.TaskKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	mine, _ := key.MintTask("demo", "t-1", time.Minute)
	theirs, _ := key.MintTask("mallory", "t-2", time.Minute)
	asTask := dataAs(t, g.Data.Addr(), mine)
	if _, err := asTask.Stat(ctx, "secret.txt"); err != nil {
		t.Fatalf("the owner's task credential reads the owner's file: %v", err)
	}
	if _, err := asTask.UploadReader(ctx, strings.NewReader("x"), -1, "notes.txt", nil); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a task credential writing outside its outputs: %v", err)
	}
	if _, err := asTask.UploadReader(ctx, strings.NewReader("x"), -1, auth.TaskOutputPrefix("t-1")+"out/x", nil); err != nil {
		t.Fatalf("a task credential writing its outputs: %v", err)
	}
	other := dataAs(t, g.Data.Addr(), theirs)
	for _, c := range []*dataclient.Client{other, other.ForOwner("demo")} {
		if fi, err := c.Stat(ctx, "secret.txt"); err == nil {
			t.Fatalf("another owner's task credential reads demo's file: %v", fi)
		}
	}
	// Nor does it open anything but the data server.
	for _, srv := range []*services.Server{g.Shop.Server, g.Plants[0].Server, g.Images.Server, g.proxy.Server} {
		res := authprobe.Probe(ctx, conn(t, srv.Addr()), "Bearer "+mine, []codes.Code{codes.Unauthenticated}, 5*time.Second,
			authprobe.Served(srv.GRPC.GetServiceInfo())...)
		t.Logf("a task credential at %s: %d of %d RPCs refused", srv.Addr(), res.Refused, res.Total)
		if res.Refused != res.Total {
			t.Errorf("a task credential at %s: admitted %v", srv.Addr(), res.Admitted)
		}
	}
}

// recvOnly adapts a stream to createErr.
type recvOnly[P any] struct {
	s interface{ Recv() (P, error) }
}

func (r recvOnly[P]) Recv() error { _, err := r.s.Recv(); return err }

// Issue 15 item 2: CreateVM with a forged owner ran as that owner, and an
// image published without a token was picked for an owner's next request.
func TestForgedOwnerAndAnonymousPublish(t *testing.T) {
	g := startAuthGrid(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	asOwner := computev1.NewPlantServiceClient(asCaller(t, g.Plants[0].Addr(), g.Token))
	err := createErr(ctx, func() (interface{ Recv() error }, error) {
		s, err := asOwner.CreateVM(ctx, &computev1.CreateVMRequest{VmId: "vm-forged", Owner: "someone-else", Image: "tiny"})
		return recvOnly[*computev1.CreateVMProgress]{s}, err
	})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("CreateVM at a plant with an owner's token: %v", err)
	}
	if _, err := asOwner.ListVMs(ctx, &computev1.ListVMsRequest{Owner: "someone-else"}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("ListVMs at a plant with an owner's token: %v", err)
	}

	file := writeFile(t, "disk.raw", []byte("not a golden image"))
	spec := imageclient.PublishSpec{Name: "evil", Files: []imageclient.PublishFile{{Name: "disk.raw", Path: file, Kind: imagev1.FileKind_FILE_KIND_DISK}}}
	for _, cc := range []*grpc.ClientConn{conn(t, g.Images.Addr()), asCaller(t, g.Images.Addr(), g.Token)} {
		_, err := imageclient.NewClient(cc).Publish(ctx, spec, nil)
		if c := status.Code(err); c != codes.Unauthenticated && c != codes.PermissionDenied {
			t.Fatalf("publishing without an operator's or publisher's token: %v", err)
		}
	}
	ops := imageclient.NewClient(asCaller(t, g.Images.Addr(), g.OperatorToken))
	list, err := ops.API.ListImages(ctx, &imagev1.ListImagesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range list.Images {
		if m.GetName() == "evil" {
			t.Fatal("the image published without a token is in the catalog")
		}
	}
	// The operator publishes (the control: the refusals above are auth).
	if _, err := ops.Publish(ctx, spec, nil); err != nil {
		t.Fatalf("the operator publishes: %v", err)
	}
}

// No role starts without tokens: there is no anonymous mode to forget on.
func TestNoRoleStartsWithoutTokens(t *testing.T) {
	ctx := context.Background()
	opts := services.Options{Listen: "127.0.0.1:0"}
	starts := map[string]func() error{
		"image server": func() error {
			_, err := imageserver.Start(ctx, imageserver.Config{Server: opts, Store: imageserver.StoreConfig{DataDir: t.TempDir()}})
			return err
		},
		"compute server": func() error {
			_, err := computeserver.Start(ctx, computeserver.Config{Server: opts, Upstream: "127.0.0.1:1", DataDir: t.TempDir()})
			return err
		},
		"cache proxy": func() error {
			_, err := computeserver.StartCacheProxy(ctx, computeserver.CacheProxyConfig{Server: opts, Upstream: "127.0.0.1:1", DataDir: t.TempDir()})
			return err
		},
		"data server": func() error {
			_, err := dataserver.Start(ctx, dataserver.Config{Server: opts, Store: dataserver.StoreConfig{DataDir: t.TempDir()}})
			return err
		},
		"shop": func() error {
			_, err := shop.Start(ctx, shop.RunConfig{Server: opts, Etcd: services.EtcdConfig{Endpoints: []string{"127.0.0.1:1"}}})
			return err
		},
	}
	for name, start := range starts {
		if err := start(); err == nil || !strings.Contains(err.Error(), "--tokens") {
			t.Errorf("%s without tokens: %v", name, err)
		}
	}
}

// dataAs is a data server client sending token over the grid's TLS.
func dataAs(t *testing.T, addr, token string) *dataclient.Client {
	t.Helper()
	cc, err := dataclient.Dial(addr, gridTLS, token)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return dataclient.NewClient(cc)
}
