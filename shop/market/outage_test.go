package market

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

// restartableEtcd is a real embedded etcd that a test can stop and start
// again on the same data directory and ports.
type restartableEtcd struct {
	tb  testing.TB
	cfg *embed.Config
	e   *embed.Etcd
}

func startRestartableEtcd(tb testing.TB) (*restartableEtcd, *clientv3.Client) {
	cfg := embed.NewConfig()
	cfg.Dir = tb.TempDir()
	cfg.UnsafeNoFsync = true
	cfg.LogLevel = "error"
	cu, pu := "http://"+freePort(tb), "http://"+freePort(tb)
	cfg.ListenClientUrls, _ = parseURLs(cu)
	cfg.AdvertiseClientUrls = cfg.ListenClientUrls
	cfg.ListenPeerUrls, _ = parseURLs(pu)
	cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
	cfg.InitialCluster = cfg.Name + "=" + pu
	r := &restartableEtcd{tb: tb, cfg: cfg}
	r.start()
	cli, err := clientv3.New(ClientConfig([]string{cu}, zap.NewNop()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cli.Close(); r.stop() })
	return r, cli
}

func (r *restartableEtcd) start() {
	e, err := embed.StartEtcd(r.cfg)
	if err != nil {
		r.tb.Fatal(err)
	}
	<-e.Server.ReadyNotify()
	r.e = e
}

func (r *restartableEtcd) stop() {
	if r.e != nil {
		r.e.Close()
		r.e = nil
	}
}

// TestPlantSurvivesAnEtcdOutage: etcd goes away for longer than the plant's
// session TTL and comes back on the same directory and ports; the plant
// registers again by itself and wins the next auction. Before, Register
// stopped for good when its session ended ("it no longer bids").
func TestPlantSurvivesAnEtcdOutage(t *testing.T) {
	etcd, cli := startRestartableEtcd(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	p := &simPlant{info: PlantInfo{Name: "A", Addr: "a:1", MemoryMiB: 4096, MemoryFreeMiB: 4096}}
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(2))
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	bidding, err := StartBidder(ctx, cli, "A", p.bid(DefaultWeights()), zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	registered, err := Register(ctx, sess, func() PlantInfo { return p.info }, 50*time.Millisecond, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); <-bidding; <-registered }()

	etcd.stop()
	time.Sleep(6 * time.Second) // three TTLs: the session is over
	select {
	case <-sess.Done():
	default:
		t.Fatal("the plant's first session outlived the outage; the test proves nothing")
	}
	etcd.start()

	deadline := time.Now().Add(20 * time.Second)
	for {
		actx, acancel := context.WithTimeout(ctx, 5*time.Second)
		bids, err := Run(actx, cli, Auction{ID: "after-" + time.Now().Format("150405.000"), MemoryMiB: 256}, time.Second)
		acancel()
		if err == nil && len(bids) == 1 && bids[0].Plant == "A" && bids[0].Refusal == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no bid from the plant 20 s after etcd came back: %v %v", bids, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The registration lives under a lease that is kept alive: it is still
	// there three TTLs later.
	time.Sleep(6 * time.Second)
	if resp, err := cli.Get(ctx, PlantsPrefix+"A"); err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("registration after the outage: %v %v", resp, err)
	}
}

// TestForgedBidsLose (issue 15 item 3): a process that can write to etcd
// bids −1e9 under a name no plant registered, and under a registered
// plant's name from another address; neither is taken, the real plant wins.
func TestForgedBidsLose(t *testing.T) {
	cli, _, _ := startMarket(t, 1, func(int) PlantInfo {
		return PlantInfo{Name: "real", Addr: "real:1", MemoryMiB: 4096, MemoryFreeMiB: 4096}
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	forge := func(name string, b Bid) {
		done, err := StartBidder(ctx, cli, name, func(Auction) Bid { return b }, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cancel(); <-done })
	}
	forge("fake", Bid{Plant: "fake", Addr: "evil:1", Cost: -1e9})
	forge("fake2", Bid{Plant: "real", Addr: "evil:2", Cost: -1e9})
	forge("fake3", Bid{Plant: "fake3", Addr: "evil:3", Cost: 0})
	bids, err := Run(ctx, cli, Auction{ID: "a", MemoryMiB: 256}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(bids) != 1 || bids[0].Plant != "real" || bids[0].Addr != "real:1" {
		t.Fatalf("bids %+v: want the real plant's only", bids)
	}

	a := Auction{ID: "x", ImageSize: 2 << 30}
	lookup := func(n string) (PlantInfo, bool) { return PlantInfo{Name: n, Addr: "p:1"}, n == "p" }
	for _, c := range []struct {
		key  string
		b    Bid
		fine bool
	}{
		{BidsPrefix + "x/p", Bid{Plant: "p", Addr: "p:1", Cost: 3}, true},
		{BidsPrefix + "x/p", Bid{Plant: "p", Addr: "p:1", Cost: -19}, true}, // 2 GiB cached at 10/GiB
		{BidsPrefix + "x/p", Bid{Plant: "p", Addr: "p:1", Cost: -21}, false},
		{BidsPrefix + "x/p", Bid{Plant: "p", Addr: "p:1", Cost: -1e9}, false},
		{BidsPrefix + "x/q", Bid{Plant: "p", Addr: "p:1", Cost: 3}, false},
		{BidsPrefix + "x/q", Bid{Plant: "q", Addr: "p:1", Cost: 3}, false},
	} {
		if err := Valid(a, c.key, c.b, lookup); (err == nil) != c.fine {
			t.Errorf("Valid(%s, %+v) = %v", c.key, c.b, err)
		}
	}
}
