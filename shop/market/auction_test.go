package market

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"sort"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

func freePort(tb testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startEtcd runs a real embedded etcd for a test.
func startEtcd(tb testing.TB) *clientv3.Client {
	tb.Helper()
	cfg := embed.NewConfig()
	cfg.Dir = tb.TempDir()
	cfg.UnsafeNoFsync = true
	cfg.LogLevel = "error"
	cu, pu := "http://"+freePort(tb), "http://"+freePort(tb)
	var err error
	if cfg.ListenClientUrls, err = parseURLs(cu); err != nil {
		tb.Fatal(err)
	}
	cfg.AdvertiseClientUrls = cfg.ListenClientUrls
	cfg.ListenPeerUrls, _ = parseURLs(pu)
	cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
	cfg.InitialCluster = cfg.Name + "=" + pu
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	<-e.Server.ReadyNotify()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{cu}, Logger: zap.NewNop()})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cli.Close(); e.Close() })
	return cli
}

// simPlant is a plant simulated in the test, bidding through real etcd.
type simPlant struct {
	mu   sync.Mutex
	info PlantInfo
}

func (p *simPlant) bid(w Weights) func(Auction) Bid {
	return func(a Auction) Bid {
		p.mu.Lock()
		defer p.mu.Unlock()
		c, r := Cost(w, p.info, a)
		return Bid{Plant: p.info.Name, Addr: p.info.Addr, Cost: c, Refusal: r}
	}
}

func runPlant(tb testing.TB, ctx context.Context, cli *clientv3.Client, p *simPlant, w Weights) {
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { sess.Close() })
	if _, err := StartBidder(ctx, cli, p.info.Name, p.bid(w), zap.NewNop()); err != nil {
		tb.Fatal(err)
	}
	if _, err := Register(ctx, sess, func() PlantInfo { p.mu.Lock(); defer p.mu.Unlock(); return p.info }, time.Hour, zap.NewNop()); err != nil {
		tb.Fatal(err)
	}
}

// TestAuctionPaperExampleThroughEtcd runs the §3.4 example as real auctions
// in etcd: two plants bid, the shop takes the lowest.
func TestAuctionPaperExampleThroughEtcd(t *testing.T) {
	cli := startEtcd(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := DefaultWeights()
	plants := map[string]*simPlant{}
	for _, n := range []string{"A", "B"} {
		p := &simPlant{info: PlantInfo{Name: n, Addr: n, MemoryMiB: 32 * 256, MemoryFreeMiB: 32 * 256, Images: map[string]uint64{}}}
		plants[n] = p
		runPlant(t, ctx, cli, p, w)
	}
	var placed []string
	for n := 1; n <= 14; n++ {
		bids, err := Run(ctx, cli, Auction{ID: fmt.Sprint("req", n), Image: "tiny", ImageSize: 110 << 20, MemoryMiB: 256, Domain: "client1"}, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if len(bids) != 2 {
			t.Fatalf("auction %d: %d bids", n, len(bids))
		}
		win := plants[bids[0].Plant]
		placed = append(placed, bids[0].Plant)
		win.mu.Lock()
		win.info.Running++
		win.info.MemoryFreeMiB -= 256
		win.info.Domains = []string{"client1"}
		win.info.Images["tiny"] = 110 << 20
		win.mu.Unlock()
	}
	for n := 1; n < 13; n++ {
		if placed[n] != placed[0] {
			t.Fatalf("VM %d left the first plant: %v", n+1, placed)
		}
	}
	if placed[13] == placed[0] {
		t.Fatalf("the 14th VM should open the second plant: %v", placed)
	}
	// The auction and its bids go right after it (their lease is revoked
	// once the bids are in, not waited for).
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		r, err := cli.Get(ctx, BidsPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err == nil && r.Count == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("bids left in etcd 5 s after the auctions: %v (%v)", r, err)
		}
	}
}

// BenchmarkPlacement measures the time from a request to the winner chosen
// (Place: shortlist from the shop's copy of the registry, auction in etcd,
// bids ranked), with many simulated plants bidding through a real etcd;
// shortlist=0 is the open auction where every plant bids.
// Run: go test -run '^$' -bench Placement -benchtime 50x ./shop/market/
func BenchmarkPlacement(b *testing.B) {
	for _, c := range []struct{ n, k int }{{10, 0}, {1000, 0}, {1000, 8}} {
		n := c.n
		b.Run(fmt.Sprintf("plants=%d/shortlist=%d", n, c.k), func(b *testing.B) {
			cli := startEtcd(b)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			// A few client connections shared by the simulated plants, as
			// plants on one host would not each hold one.
			clients := []*clientv3.Client{cli}
			for range 3 {
				c, err := clientv3.New(clientv3.Config{Endpoints: cli.Endpoints(), Logger: zap.NewNop()})
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				clients = append(clients, c)
			}
			for i := range n {
				p := &simPlant{info: PlantInfo{Name: fmt.Sprintf("p%04d", i), Addr: "x", MemoryMiB: 8192, MemoryFreeMiB: 8192, Running: i % 7}}
				c := clients[i%len(clients)]
				sess, err := concurrency.NewSession(c, concurrency.WithTTL(30))
				if err != nil {
					b.Fatal(err)
				}
				defer sess.Close()
				if _, err := Register(ctx, sess, func() PlantInfo { return p.info }, time.Hour, zap.NewNop()); err != nil {
					b.Fatal(err)
				}
				if _, err := StartBidder(ctx, c, p.info.Name, p.bid(DefaultWeights()), zap.NewNop()); err != nil {
					b.Fatal(err)
				}
			}
			reg, err := WatchRegistry(ctx, cli, zap.NewNop())
			if err != nil {
				b.Fatal(err)
			}
			defer reg.Close()
			time.Sleep(time.Second)
			if got := len(reg.Plants()); got != n {
				b.Fatalf("%d plants in the registry, want %d", got, n)
			}
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				start := time.Now()
				bids, open, err := Place(ctx, cli, reg, Auction{ID: fmt.Sprint("b", i), MemoryMiB: 256}, c.k, 5*time.Second)
				want := n // every plant bids, or the shortlist does
				if c.k > 0 {
					want = c.k
				}
				if err != nil || open || len(bids) != want || bids[0].Refusal != "" {
					b.Fatalf("%d bids, want %d (open=%v): %v", len(bids), want, open, err)
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
		})
	}
}

func parseURLs(s string) ([]url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, err
	}
	return []url.URL{*u}, nil
}
