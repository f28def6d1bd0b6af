package market

import (
	"context"
	"fmt"
	"os"
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
		placeAtScale(b, n)
	}
}

// placeAtScale registers n plants once (a sub-benchmark's function runs
// more than once: with b.N = 1 first) and measures placements among them.
func placeAtScale(b *testing.B, n int) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stops []func()
	defer func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}()
	sub := &cleanups{TB: b, push: func(f func()) { stops = append(stops, f) }}
	cli := startEtcd(sub)
	reg := registerSimPlants(sub, ctx, cli, n)
	runs := 0
	b.Run(fmt.Sprintf("plants=%d/shortlist=8", n), func(b *testing.B) {
		lat := make([]time.Duration, 0, b.N)
		rev0 := revision(b, cli)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			start := time.Now()
			bids, open, err := Place(ctx, cli, reg, Auction{ID: fmt.Sprint("s", runs, "-", i), MemoryMiB: 256}, 8, 5*time.Second)
			if err != nil || open || len(bids) < 8 || bids[0].Refusal != "" {
				b.Fatalf("%d bids, want 8 (open=%v): %v", len(bids), open, err)
			}
			lat = append(lat, time.Since(start))
		}
		b.StopTimer()
		runs++
		writes := float64(revision(b, cli)-rev0) / float64(b.N)
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
		b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
		b.ReportMetric(writes, "etcd-writes/placement")
	})
}

// cleanups is a testing.TB whose Cleanup functions run when the caller
// says, not at the end of the benchmark.
type cleanups struct {
	testing.TB
	push func(func())
}

func (c *cleanups) Cleanup(f func()) { c.push(f) }
func (c *cleanups) TempDir() string {
	d, err := os.MkdirTemp("", "placement-etcd-")
	if err != nil {
		c.Fatal(err)
	}
	c.push(func() { os.RemoveAll(d) })
	return d
}

// registerSimPlants registers n simulated plants (sessions, bidders,
// registrations through 32 client connections: a connection sets its
// watches up one at a time, and real plants each have their own) and
// returns the shop's registry once it holds them all.
func registerSimPlants(b testing.TB, ctx context.Context, cli *clientv3.Client, n int) *Registry {
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
	// A plant that cannot join within 30 s fails the benchmark (it says why)
	// rather than wait in the etcd client's retries.
	work := make(chan int)
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				jctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				if err := simPlantJoin(ctx, jctx, clients[i%len(clients)], i); err != nil {
					errs <- fmt.Errorf("plant %d: %w", i, err)
				}
				cancel()
			}
		}()
	}
	for i := range n {
		if i > 0 && i%1000 == 0 {
			fmt.Printf("  %d plants joining after %s\n", i, time.Since(start).Round(time.Millisecond))
		}
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
	fmt.Printf("%d plants registered in %s\n", n, time.Since(start).Round(time.Millisecond))
	return reg
}

// simPlantJoin is one simulated plant: a session (kept alive until the
// benchmark's context ends), a bidder and its registration. The session's
// TTL is 30 s, not a real plant's 5: 10,000 leases kept alive at TTL/3
// would be 6,000 keepalives a second, more than one 2-core machine
// simulating every plant and serving etcd keeps up with (10,000 plants on
// their own hosts spread that over the cluster's members).
func simPlantJoin(ctx, jctx context.Context, c *clientv3.Client, i int) error {
	p := &simPlant{info: PlantInfo{Name: fmt.Sprintf("p%05d", i), Addr: "x", MemoryMiB: 8192, MemoryFreeMiB: 8192, Running: i % 7}}
	lease, err := c.Grant(jctx, 30)
	if err != nil {
		return fmt.Errorf("lease: %w", err)
	}
	sess, err := concurrency.NewSession(c, concurrency.WithLease(lease.ID), concurrency.WithContext(ctx))
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
