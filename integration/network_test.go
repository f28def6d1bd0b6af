package integration

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/computeserver/vnet"
	"github.com/vmgrid/vmgrid/computeserver/vnet/vnettest"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop"
	"github.com/vmgrid/vmgrid/shop/market"
)

// netGrid is a grid whose plants are separate hosts: each plant's network
// devices and underlay address live in a namespace of its own on a test
// LAN, and the VXLAN underlay runs between those namespaces. Control
// traffic (etcd, gRPC, the image server) stays on loopback.
type netGrid struct {
	t       *testing.T
	is      *testutil.Server // the image server
	images  string
	etcd    string
	tokens  *auth.Tokens
	plants  map[string]*computeserver.Server
	hosts   map[string]vnettest.Host
	dirs    map[string]string
	stops   map[string]func()
	shop    *shop.Server
	clients map[string]shopv1.ShopServiceClient // by owner
	// drain is the plants' drain timeout (drain_test.go; 0: none).
	drain time.Duration
	// advertise is the address a plant registers instead of its own
	// (migrate_cut_test.go: a proxy that can go silent); unset: its own.
	advertise map[string]string
	lan       *vnettest.LAN
}

const netBobToken = "owner-token-bob0"

func freeTCP(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func startNetGrid(t *testing.T, ctx context.Context, plants ...string) *netGrid {
	is := testutil.StartServer(t, "")
	_, err := plant.BuildGolden(ctx, plant.GoldenOptions{
		Name: "tiny", WorkDir: testutil.ShortTempDir(t), Driver: &vmm.QEMU{}, Publish: is.Client, Logger: zaptest.NewLogger(t),
		Recipe: &imagebuild.Tiny{Hook: plant.GoldenHook, ExtraFiles: map[string]string{"/sbin/vmgrid-agent": testutil.GuestAgent(t)}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ee, err := shop.StartEtcd(testutil.ShortTempDir(t), freeTCP(t), freeTCP(t), true, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ee.Close)
	tokens := testutil.Tokens(t)
	if err := tokens.Add(netBobToken, "bob"); err != nil {
		t.Fatal(err)
	}
	g := &netGrid{t: t, is: is, images: is.Srv.Addr(), etcd: ee.Endpoint, tokens: tokens, plants: map[string]*computeserver.Server{},
		hosts: map[string]vnettest.Host{}, dirs: map[string]string{}, stops: map[string]func(){}, clients: map[string]shopv1.ShopServiceClient{}}
	g.lan = vnettest.NewLAN(t)
	for _, name := range plants {
		g.addPlant(name)
	}
	g.startShop(ctx)
	return g
}

// addPlant starts a plant on a new host of the LAN.
func (g *netGrid) addPlant(name string) {
	g.hosts[name], g.dirs[name] = g.lan.Host(), testutil.ShortTempDir(g.t)
	g.startPlant(name)
}

// startPlant starts (or restarts) a plant in its host's namespace.
func (g *netGrid) startPlant(name string) {
	t := g.t
	ctx, cancel := context.WithCancel(context.Background())
	cfg := computeserver.Config{
		Server:   services.Options{Name: "computeserver", Listen: "127.0.0.1:0", Logger: zaptest.NewLogger(t).Named(name)},
		Upstream: g.images, DataDir: g.dirs[name], Proxy: gvfs.Config{FlushIdle: -1}, Tokens: g.tokens, Name: name,
		ServiceTokenFile: testutil.ServiceTokenFile(t), // plants call each other to migrate VMs
		GuestMemoryMiB:   2048, Etcd: services.EtcdConfig{Endpoints: []string{g.etcd}},
		Network: vnet.Config{Underlay: g.hosts[name].Addr, Netns: g.hosts[name].Netns}, DrainTimeout: g.drain,
		Advertise: g.advertise[name],
	}
	s, err := computeserver.Start(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { s.Serve(ctx); close(done) }()
	stopped := false
	g.plants[name], g.stops[name] = s, func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
	}
	t.Cleanup(g.stops[name])
}

func (g *netGrid) startShop(ctx context.Context) {
	t := g.t
	s, err := shop.Start(ctx, shop.RunConfig{
		Server: services.Options{Name: "shop", Listen: "127.0.0.1:0", Logger: zaptest.NewLogger(t).Named("shop")},
		Etcd:   services.EtcdConfig{Endpoints: []string{g.etcd}}, Images: g.images, Tokens: g.tokens,
		ServiceTokenFile: testutil.ServiceTokenFile(t),
		// Spread VMs: the test wants a domain on two plants.
		Weights: market.Weights{Compute: 100, Network: 0}, AuctionDeadline: time.Second, Shortlist: 8,
	})
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Serve(sctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	g.shop = s
	for owner, token := range map[string]string{"alice": testutil.OwnerToken, "bob": netBobToken} {
		cc, err := services.Dial(s.Addr(), services.TLSFiles{}, testutil.As(token))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		g.clients[owner] = shopv1.NewShopServiceClient(cc)
	}
}

func (g *netGrid) create(ctx context.Context, owner, req, domain string) (*computev1.ClassAd, error) {
	return testutil.CreateVM(ctx, g.clients[owner], &shopv1.CreateVMRequest{RequestId: req, NetworkDomain: domain})
}

// sh runs a script in a VM through its plant's agent.
func (g *netGrid) sh(ctx context.Context, ad *computev1.ClassAd, script string) (string, int) {
	g.t.Helper()
	resp, err := g.plants[ad.Plant].Line.Exec(ctx, ad.VmId, &computev1.ExecAction{Argv: []string{"sh", "-c", script}, TimeoutSeconds: 60})
	if err != nil || resp.Error != "" {
		g.t.Fatalf("exec %q in %s: %v %s", script, ad.VmId, err, resp.GetError())
	}
	return strings.TrimSpace(string(resp.Stdout) + string(resp.Stderr)), int(resp.ExitCode)
}

// registered counts the plants in the registry.
func (g *netGrid) registered(ctx context.Context) int {
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{g.etcd}})
	if err != nil {
		return 0
	}
	defer cli.Close()
	resp, err := cli.Get(ctx, market.PlantsPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return 0
	}
	return int(resp.Count)
}

func ipOf(ad *computev1.ClassAd) string {
	return netip.MustParsePrefix(ad.GetNetwork().GetAddress()).Addr().String()
}

// TestNetworks: two plants on separate hosts; a domain's VMs on both talk
// TCP over the VXLAN; another owner's VM never reaches them; the plant
// dials its guests; leases are distinct and released; a restarted plant
// leaves no stale device.
func TestNetworks(t *testing.T) {
	testutil.NeedQEMU(t)
	vnettest.NeedRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	g := startNetGrid(t, ctx, "pa", "pb")
	eventually(t, "both plants registered", func() bool { return g.registered(ctx) == 2 })

	// Two VMs of alice's domain "lab", at once: distinct addresses, and
	// (compute cost 100, network 0) on both plants.
	type res struct {
		ad  *computev1.ClassAd
		err error
	}
	ch := make(chan res, 2)
	for i := range 2 {
		go func() {
			ad, err := g.create(ctx, "alice", fmt.Sprint("lab", i), "lab")
			ch <- res{ad, err}
		}()
	}
	var lab []*computev1.ClassAd
	for range 2 {
		r := <-ch
		if r.err != nil {
			t.Fatalf("create: %v", r.err)
		}
		lab = append(lab, r.ad)
	}
	a, b := lab[0], lab[1]
	if a.Network.GetAddress() == b.Network.GetAddress() || a.Network.GetMac() == b.Network.GetMac() || a.Network.Vni != b.Network.Vni {
		t.Fatalf("leases %v and %v", a.Network, b.Network)
	}
	if a.Plant == b.Plant {
		// Both auctions ran before either plant's offer changed: move on
		// with a third VM, which goes to the emptier plant.
		c, err := g.create(ctx, "alice", "lab2", "lab")
		if err != nil {
			t.Fatal(err)
		}
		if c.Plant == a.Plant {
			t.Fatalf("three VMs on plant %s", c.Plant)
		}
		b = c
		lab = append(lab, c)
	}
	t.Logf("lab: %s on %s at %s, %s on %s at %s", a.VmId, a.Plant, ipOf(a), b.VmId, b.Plant, ipOf(b))

	t.Run("a domain's VMs on two plants talk TCP", func(t *testing.T) {
		g.sh(ctx, b, "nc -l -p 5000 </dev/null >/tmp/got 2>&1 &")
		eventually(t, "b listens", func() bool { out, _ := g.sh(ctx, b, "netstat -ltn | grep -c :5000"); return out == "1" })
		if out, code := g.sh(ctx, a, "echo hello-over-vxlan | nc -w 5 "+ipOf(b)+" 5000"); code != 0 {
			t.Fatalf("nc from a: exit %d: %s", code, out)
		}
		eventually(t, "b got the message", func() bool { out, _ := g.sh(ctx, b, "cat /tmp/got"); return out == "hello-over-vxlan" })
		if host, _ := g.sh(ctx, a, "hostname"); host != a.VmId {
			t.Errorf("hostname %q, want %q", host, a.VmId)
		}
	})

	t.Run("another owner's domain never reaches them", func(t *testing.T) {
		if _, err := g.create(ctx, "bob", "steal", "lab"); errdefs.Code(err) != codes.PermissionDenied {
			t.Fatalf("bob naming alice's domain: %v, want PermissionDenied", err)
		}
		// The intruder on b's own plant (the emptier plant gets the next VM).
		var x *computev1.ClassAd
		for i := 0; x == nil || x.Plant != b.Plant; i++ {
			if i == 3 {
				t.Fatalf("no VM of bob's landed on %s", b.Plant)
			}
			var err error
			if x, err = g.create(ctx, "bob", fmt.Sprint("x", i), "bobnet"); err != nil {
				t.Fatal(err)
			}
			defer g.clients["bob"].DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: x.VmId})
		}
		// It takes an address in lab's subnet itself and tries.
		g.sh(ctx, b, "nc -l -p 5001 </dev/null >/tmp/intruder 2>&1 &")
		fake := netip.MustParsePrefix(b.Network.Address).Addr().Next().Next().Next().String()
		nm := g.plants[b.Plant].Line.Network()
		sent0, _ := nm.Counters(x.Network.Vni, x.VmId)
		for _, s := range []string{"ip addr add " + fake + "/24 dev eth0", "ping -c 3 -W 1 " + ipOf(b), "echo intruder | nc -w 2 " + ipOf(b) + " 5001"} {
			out, code := g.sh(ctx, x, s)
			t.Logf("intruder: %s: exit %d: %s", s, code, out)
		}
		sent1, _ := nm.Counters(x.Network.Vni, x.VmId)
		if sent1.RxPackets < sent0.RxPackets+3 {
			t.Fatalf("the intruder sent nothing (its tap took %d packets): the test proves nothing", sent1.RxPackets-sent0.RxPackets)
		}
		if out, _ := g.sh(ctx, b, "cat /tmp/intruder; cat /proc/net/arp"); strings.Contains(out, "intruder") || strings.Contains(out, fake+" ") {
			t.Fatalf("the intruder's packets arrived at %s:\n%s", b.VmId, out)
		}
		if out, _ := g.sh(ctx, b, "netstat -ltn | grep -c :5001"); out != "1" {
			t.Fatalf("the listener is gone (a connection came): %s", out)
		}
	})

	t.Run("the plant dials its guest", func(t *testing.T) {
		g.sh(ctx, b, "echo from-the-guest | nc -l -p 5002 >/dev/null 2>&1 &")
		eventually(t, "b listens on 5002", func() bool { out, _ := g.sh(ctx, b, "netstat -ltn | grep -c :5002"); return out == "1" })
		c, err := g.plants[b.Plant].Line.DialGuest(ctx, b.VmId, 5002)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(c)
		c.Close()
		if strings.TrimSpace(string(got)) != "from-the-guest" {
			t.Fatalf("read %q", got)
		}
		if _, err := g.plants[b.Plant].Line.DialGuest(ctx, "vm-nope", 22); !errdefs.IsNotFound(err) {
			t.Fatalf("unknown VM: %v", err)
		}
		// The guest cannot reach the plant: its dialer listens nowhere
		// and the plant's own address is not on the segment.
		if out, code := g.sh(ctx, b, "nc -w 2 "+g.hosts[b.Plant].Addr+" 1 </dev/null"); code == 0 {
			t.Fatalf("the guest reached its plant's underlay: %s", out)
		}
	})

	t.Run("destroy releases the lease and the segment", func(t *testing.T) {
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{g.etcd}})
		if err != nil {
			t.Fatal(err)
		}
		defer cli.Close()
		for _, v := range lab {
			if v.VmId == b.VmId {
				continue
			}
			if _, err := g.clients["alice"].DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: v.VmId}); err != nil {
				t.Fatal(err)
			}
		}
		resp, err := cli.Get(ctx, "/vmgrid/net/vms/"+a.VmId)
		if err != nil || len(resp.Kvs) != 0 {
			t.Fatalf("lease of %s after destroy: %v %v", a.VmId, resp, err)
		}
		if a.Plant != b.Plant {
			devs, _ := g.plants[a.Plant].Line.Network().Devices()
			if len(devs) != 0 {
				t.Fatalf("plant %s keeps %v with no VM left", a.Plant, devs)
			}
		}
	})

	t.Run("a restarted plant leaves no stale device", func(t *testing.T) {
		name := b.Plant
		// What a killed plant leaves: its segment and a tap nobody holds.
		left, err := vnet.New(vnet.Config{Underlay: g.hosts[name].Addr, Netns: g.hosts[name].Netns, Prefix: computeserver.NetworkPrefix(name, g.dirs[name])}, nil)
		if err != nil {
			t.Fatal(err)
		}
		g.stops[name]() // stops its VMs and removes its devices
		at, err := left.Attach(4000, &net.IPNet{IP: net.ParseIP("10.99.0.1"), Mask: net.CIDRMask(24, 32)}, "vm-gone")
		if err != nil {
			t.Fatal(err)
		}
		defer at.Tap.Close()
		if devs, _ := left.Devices(); len(devs) != 3 { // bridge, VXLAN, tap
			t.Fatalf("the leftovers: %v", devs)
		}
		g.startPlant(name)
		devs, err := g.plants[name].Line.Network().Devices()
		if err != nil || len(devs) != 0 {
			t.Fatalf("after restart: %v %v", devs, err)
		}
	})
}
