//go:build faults

package faults

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/internal/authprobe"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// Security probes: where a request would make a plant send its
// credentials, and every RPC of every role called as an outsider.

// recorder is a gRPC server that answers nothing and records every
// connection and the metadata of every call it gets.
type recorder struct {
	conns atomic.Int64
	mu    sync.Mutex
	md    []metadata.MD
	addr  string
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func startRecorder(t *testing.T) *recorder {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &recorder{addr: l.Addr().String()}
	gs := grpc.NewServer(grpc.UnknownServiceHandler(func(_ any, st grpc.ServerStream) error {
		md, _ := metadata.FromIncomingContext(st.Context())
		r.mu.Lock()
		r.md = append(r.md, md)
		r.mu.Unlock()
		return status.Error(codes.Unimplemented, "recorder")
	}))
	go gs.Serve(countingListener{l, &r.conns}) //nolint:errcheck
	t.Cleanup(gs.Stop)
	return r
}

// exfiltration: a DAG whose stage_in names a data server of the user's
// choice is refused, by the shop and by a plant, and nothing ever
// connects to that address.
func (g *grid) exfiltration(t *testing.T) {
	r := startRecorder(t)
	dag := &computev1.ConfigDAG{Actions: []*computev1.Action{{Id: "in", Kind: &computev1.Action_StageIn{
		StageIn: &computev1.StageInAction{Dataserver: r.addr, Files: []string{"in/secret"}}}}}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := createVM(ctx, g.shopClient(ownerToken), &shopv1.CreateVMRequest{RequestId: "exfil-1", Image: "tiny", Config: dag})
	wantExfil(t, "shop CreateVM with stage_in.dataserver", err)
	pc := computev1.NewPlantServiceClient(g.dial(g.plants[0].addr, serviceToken))
	st, err := pc.CreateVM(ctx, &computev1.CreateVMRequest{VmId: "exfil-2", Owner: "demo", Image: "tiny", Config: dag})
	if err == nil {
		_, err = st.Recv()
	}
	wantExfil(t, "plant CreateVM with stage_in.dataserver", err)
	time.Sleep(2 * time.Second) // a plant that staged would have dialed by now
	if n := r.conns.Load(); n != 0 {
		r.mu.Lock()
		t.Errorf("the address in the DAG got %d connections; metadata sent: %v", n, r.md)
		r.mu.Unlock()
		exfilLeaked.Add(1)
	}
}

func wantExfil(t *testing.T, what string, err error) {
	t.Helper()
	exfilTried.Add(1)
	if got := status.Code(err); got != codes.InvalidArgument {
		t.Errorf("%s: %v, want InvalidArgument", what, err)
		return
	}
	exfilRefused.Add(1)
}

// target is a role's port and the services it serves.
type target struct {
	role, addr string
	descs      []grpc.ServiceDesc
}

func (g *grid) targets() []target {
	return []target{
		{"imageserver", g.images.addr, []grpc.ServiceDesc{imagev1.ImageService_ServiceDesc}},
		{"dataserver", g.data.addr, []grpc.ServiceDesc{datav1.DataService_ServiceDesc}},
		{"computeserver", g.plants[0].addr, []grpc.ServiceDesc{computev1.PlantService_ServiceDesc, computev1.CacheService_ServiceDesc}},
		// A cache proxy serves the image API only (no CacheService).
		{"cacheproxy", g.proxy.addr, []grpc.ServiceDesc{imagev1.ImageService_ServiceDesc}},
		{"shop", g.shop.addr, []grpc.ServiceDesc{shopv1.ShopService_ServiceDesc}},
	}
}

// unauthenticated calls every RPC of every role with no token and with a
// wrong one (and the plant's and the proxy's with an owner's token, which
// only the shop may relay). Roles that authenticate (they take --tokens)
// must refuse them all; the others are counted, so the numbers show what
// is still open.
func (g *grid) unauthenticated(t *testing.T) {
	modes := []struct{ name, auth string }{{"no token", ""}, {"wrong token", "Bearer " + wrongToken}}
	for _, tg := range g.targets() {
		cc := g.dial(tg.addr, "")
		for _, m := range modes {
			r := authprobe.Probe(context.Background(), cc, m.auth, []codes.Code{codes.Unauthenticated}, 5*time.Second, tg.descs...)
			g.countProbe(t, tg, m.name, r)
		}
		// An owner may read images from the proxy, but neither order a
		// plant about nor write through the proxy.
		switch tg.role {
		case "computeserver":
			g.countProbe(t, tg, "owner token", authprobe.Probe(context.Background(), cc, "Bearer "+ownerToken,
				[]codes.Code{codes.PermissionDenied}, 5*time.Second, tg.descs...))
		case "cacheproxy":
			g.countProbe(t, tg, "owner token", authprobe.Probe(context.Background(), cc, "Bearer "+ownerToken,
				[]codes.Code{codes.PermissionDenied}, 5*time.Second,
				authprobe.Only(imagev1.ImageService_ServiceDesc, "Publish", "DeleteImage", "CreateDisk", "WriteBlocks", "PutProfile")))
		}
		if err := healthy(tg.addr); err != nil {
			t.Errorf("%s after the probes: %v", tg.role, err)
		}
	}
}

func (g *grid) countProbe(t *testing.T, tg target, mode string, r authprobe.Result) {
	countProbe(tg.role, r.Refused, r.Total)
	t.Logf("%s, %s: %d of %d RPCs refused", tg.role, mode, r.Refused, r.Total)
	if authWired(t, tg.role) && r.Refused != r.Total {
		t.Errorf("%s authenticates, yet with %s: %v", tg.role, mode, r.Admitted)
	}
}
