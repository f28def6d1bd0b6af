package market

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
)

// BenchmarkPlacement10k is placement at scale: 10,000 plants registered in
// a real etcd, each under its own 5 s session lease kept alive as real
// plants keep theirs, each watching for its invitations; the shop's Place
// (shortlist of 8 from its watched copy of the registry, the auction
// published in etcd, the invited plants' bids collected and ranked). 1,000
// plants run in the same benchmark for comparison. It reports p50/p99 of
// placement and the etcd writes per placement (revisions: the auction, each
// bid, the lease revoked with them). The target: p99 ≤ 50 ms.
// Run: make bench-placement
// (go test -run '^$' -bench Placement10k -benchtime 200x -timeout 20m ./shop/market/)
func BenchmarkPlacement10k(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("plants=%d/shortlist=8", n), func(b *testing.B) {
			cli := startEtcd(b)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			reg := registerSimPlants(b, ctx, cli, n)
			lat := make([]time.Duration, 0, b.N)
			rev0 := revision(b, cli)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				start := time.Now()
				bids, open, err := Place(ctx, cli, reg, Auction{ID: fmt.Sprint("s", i), MemoryMiB: 256}, 8, 5*time.Second)
				if err != nil || open || len(bids) != 8 || bids[0].Refusal != "" {
					b.Fatalf("%d bids, want 8 (open=%v): %v", len(bids), open, err)
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			writes := float64(revision(b, cli)-rev0) / float64(b.N)
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
			b.ReportMetric(writes, "etcd-writes/placement")
		})
	}
}

// registerSimPlants registers n simulated plants (sessions, bidders,
// registrations through 32 client connections: a connection sets its
// watches up one at a time, and real plants each have their own) and
// returns the shop's registry once it holds them all.
func registerSimPlants(b *testing.B, ctx context.Context, cli *clientv3.Client, n int) *Registry {
	clients := []*clientv3.Client{cli}
	for range 31 {
		c, err := clientv3.New(clientv3.Config{Endpoints: cli.Endpoints(), Logger: zap.NewNop()})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		clients = append(clients, c)
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	work := make(chan int)
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				if err := simPlantJoin(ctx, clients[i%len(clients)], i); err != nil {
					errs <- err
				}
			}
		}()
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	reg, err := WatchRegistry(ctx, cli, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(reg.Close)
	for deadline := time.Now().Add(time.Minute); reg.Len() != n; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			b.Fatalf("%d plants in the registry, want %d", reg.Len(), n)
		}
	}
	b.Logf("%d plants registered in %s", n, time.Since(start).Round(time.Millisecond))
	return reg
}

// simPlantJoin is one simulated plant: a 5 s session (kept alive until the
// benchmark's context ends), a bidder and its registration.
func simPlantJoin(ctx context.Context, c *clientv3.Client, i int) error {
	p := &simPlant{info: PlantInfo{Name: fmt.Sprintf("p%05d", i), Addr: "x", MemoryMiB: 8192, MemoryFreeMiB: 8192, Running: i % 7}}
	sess, err := concurrency.NewSession(c, concurrency.WithTTL(5), concurrency.WithContext(ctx))
	if err != nil {
		return err
	}
	if _, err := StartBidder(ctx, c, p.info.Name, p.bid(DefaultWeights()), zap.NewNop()); err != nil {
		return err
	}
	_, err = Register(ctx, sess, func() PlantInfo { return p.info }, time.Hour, zap.NewNop())
	return err
}

func revision(b *testing.B, cli *clientv3.Client) int64 {
	r, err := cli.Get(context.Background(), "/vmgrid/none")
	if err != nil {
		b.Fatal(err)
	}
	return r.Header.Revision
}
