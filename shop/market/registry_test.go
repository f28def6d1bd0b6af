package market

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func byName(ps []PlantInfo) map[string]PlantInfo {
	m := map[string]PlantInfo{}
	for _, p := range ps {
		m[p.Name] = p
	}
	return m
}

// TestRegistryFollowsEtcd: a shop's copy of the registry sees plants join,
// change their offers and leave.
func TestRegistryFollowsEtcd(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	reg, err := WatchRegistry(ctx, cli, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	if n := len(reg.Plants()); n != 0 {
		t.Fatalf("%d plants in an empty registry", n)
	}

	p := &simPlant{info: PlantInfo{Name: "A", MemoryMiB: 1024, MemoryFreeMiB: 1024}}
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	pctx, stop := context.WithCancel(ctx)
	done, err := Register(pctx, sess, func() PlantInfo { p.mu.Lock(); defer p.mu.Unlock(); return p.info }, 10*time.Millisecond, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "A registered", func() bool { _, ok := byName(reg.Plants())["A"]; return ok })

	p.mu.Lock()
	p.info.Running = 3
	p.mu.Unlock()
	waitUntil(t, "A's new offer", func() bool { return byName(reg.Plants())["A"].Running == 3 })

	stop()
	<-done
	waitUntil(t, "A gone", func() bool { return len(reg.Plants()) == 0 })
}

func TestShortlist(t *testing.T) {
	w := DefaultWeights()
	plants := []PlantInfo{
		{Name: "busy", MemoryMiB: 4096, MemoryFreeMiB: 4096, Running: 9},
		{Name: "full", MemoryMiB: 4096, MemoryFreeMiB: 100},
		{Name: "idle1", MemoryMiB: 4096, MemoryFreeMiB: 4096},
		{Name: "idle2", MemoryMiB: 4096, MemoryFreeMiB: 4096},
		{Name: "warm", MemoryMiB: 4096, MemoryFreeMiB: 4096, Running: 1, Domains: []string{"d"}},
	}
	a := Auction{MemoryMiB: 256, Domain: "d"}
	seen := map[string]bool{}
	for range 50 {
		inv, ref := Shortlist(w, plants, a, 2)
		if len(inv) != 2 || inv[0] != "warm" || (inv[1] != "idle1" && inv[1] != "idle2") {
			t.Fatalf("shortlist %v: want warm (4, no new network) then an idle plant (50)", inv)
		}
		seen[inv[1]] = true
		if len(ref) != 1 || ref[0].Plant != "full" || ref[0].Refusal == "" {
			t.Fatalf("refusals %+v", ref)
		}
	}
	if !seen["idle1"] || !seen["idle2"] {
		t.Fatalf("equal offers not drawn at random: %v", seen)
	}
	if inv, _ := Shortlist(w, plants, a, 10); len(inv) != 4 {
		t.Fatalf("a shortlist longer than the candidates: %v", inv)
	}
}

// TestShortlistTakesTheCheapest: the heap keeps exactly the k cheapest of
// many plants, cheapest first (against a full sort).
func TestShortlistTakesTheCheapest(t *testing.T) {
	w := DefaultWeights()
	a := Auction{MemoryMiB: 256}
	plants := make([]PlantInfo, 3000)
	for i := range plants {
		plants[i] = PlantInfo{Name: fmt.Sprint("p", i), MemoryMiB: 8192, MemoryFreeMiB: uint64(300 + (i*7919)%7000), Running: (i * 31) % 11}
	}
	costs := map[string]float64{}
	var all []float64
	for _, p := range plants {
		if c, why := Cost(w, p, a); why == "" {
			costs[p.Name] = c
			all = append(all, c)
		}
	}
	slices.Sort(all)
	for _, k := range []int{1, 8, 100} {
		inv, _ := Shortlist(w, plants, a, k)
		if len(inv) != k {
			t.Fatalf("k=%d: %d invited", k, len(inv))
		}
		for i, name := range inv {
			if costs[name] != all[i] {
				t.Fatalf("k=%d: invited #%d %s costs %v, the %d-th cheapest costs %v", k, i, name, costs[name], i, all[i])
			}
		}
	}
}

// BenchmarkShortlist: pricing a registry of n plants and taking 8.
func BenchmarkShortlist(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		plants := make([]PlantInfo, n)
		for i := range plants {
			plants[i] = PlantInfo{Name: fmt.Sprint("p", i), Arch: "x86_64", MemoryMiB: 8192, MemoryFreeMiB: uint64(1024 + i%4096),
				Running: i % 7, Images: map[string]uint64{"tiny": uint64(i%3) << 20}}
		}
		a := Auction{Image: "tiny", MemoryMiB: 256, Arch: "x86_64"}
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			for b.Loop() {
				Shortlist(DefaultWeights(), plants, a, 8)
			}
		})
	}
}

// startMarket runs n simulated plants (bidding through etcd) and a registry.
func startMarket(t *testing.T, n int, info func(i int) PlantInfo) (*clientv3.Client, *Registry, []*simPlant) {
	cli := startEtcd(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	var plants []*simPlant
	for i := range n {
		p := &simPlant{info: info(i)}
		plants = append(plants, p)
		runPlant(t, ctx, cli, p, DefaultWeights())
	}
	reg, err := WatchRegistry(ctx, cli, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(reg.Close)
	waitUntil(t, "plants registered", func() bool { return len(reg.Plants()) == n })
	return cli, reg, plants
}

// bidsWritten counts the bids written to etcd for an auction; the returned
// function stops counting (after the stragglers had time) and says how many.
func bidsWritten(t *testing.T, cli *clientv3.Client, id string) func() int64 {
	var n int64
	wctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	wch := cli.Watch(wctx, BidsPrefix+id+"/", clientv3.WithPrefix(), clientv3.WithFilterDelete(), clientv3.WithCreatedNotify())
	<-wch
	done := make(chan struct{})
	go func() {
		defer close(done)
		for resp := range wch {
			n += int64(len(resp.Events))
		}
	}()
	return func() int64 { time.Sleep(300 * time.Millisecond); cancel(); <-done; return n }
}

// TestPlaceInvitesTheShortlist: with 20 plants and k = 3, only three bid, and
// the cheapest plant of all wins.
func TestPlaceInvitesTheShortlist(t *testing.T) {
	cli, reg, _ := startMarket(t, 20, func(i int) PlantInfo {
		return PlantInfo{Name: fmt.Sprintf("p%02d", i), MemoryMiB: 4096, MemoryFreeMiB: 4096, Running: 20 - i}
	})
	a := Auction{ID: "a1", MemoryMiB: 256}
	written := bidsWritten(t, cli, a.ID)
	bids, open, err := Place(context.Background(), cli, reg, a, 3, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if open || len(bids) != 3 || bids[0].Plant != "p19" {
		t.Fatalf("open=%v bids %+v: want the three of the shortlist, p19 first", open, bids)
	}
	if n := written(); n != 3 {
		t.Fatalf("%d bids were written to etcd, want 3", n)
	}
}

// TestPlaceFallsBackToAnOpenAuction: the plants that posted the cheapest
// offers can no longer host the VM; the shop asks every plant.
func TestPlaceFallsBackToAnOpenAuction(t *testing.T) {
	cli, reg, plants := startMarket(t, 6, func(i int) PlantInfo {
		return PlantInfo{Name: fmt.Sprintf("p%d", i), MemoryMiB: 4096, MemoryFreeMiB: 4096, Running: i}
	})
	// p0 and p1 filled up since they registered (their refresh is hourly
	// here): the registry still shows them empty.
	for _, p := range plants[:2] {
		p.mu.Lock()
		p.info.MemoryFreeMiB = 0
		p.mu.Unlock()
	}
	bids, open, err := Place(context.Background(), cli, reg, Auction{ID: "a2", MemoryMiB: 256}, 2, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !open || len(bids) != 6 || bids[0].Plant != "p2" || bids[0].Refusal != "" {
		t.Fatalf("open=%v bids %+v: want an open auction won by p2", open, bids)
	}
	if r := Refusals(bids); r == "" {
		t.Fatal("the full plants' refusals are missing")
	}
}
