// Package market is the bidding protocol between the shop and the plants
// (VMPlants §3.4), carried by etcd:
//
//	/vmgrid/plants/PLANT          PlantInfo, under the plant's session lease:
//	                              a plant that dies disappears with its lease
//	/vmgrid/auctions/ID           Auction open to every plant, under the
//	                              auction's lease
//	/vmgrid/invites/PLANT/ID      Auction for invited plants: one key per
//	                              plant, written in one transaction
//	/vmgrid/bids/ID/PLANT         Bid, under the same lease: an auction and its
//	                              bids vanish together when the shop is done
//
// The shop publishes an auction; every plant watching the auctions prefix
// that is invited answers with a bid (a cost, or a refusal with the reason);
// the shop takes the lowest cost within a deadline, ties broken at random.
//
// An auction open to every plant costs one etcd write per plant, which is
// what bounds placement latency with many plants. The shop therefore keeps a
// watched copy of the registry (Registry), prices every plant's posted offer
// with the auction's weights, and invites only the few best (Shortlist); the
// invited plants bid with their live state. If none of them can host the VM
// (their posted offers were stale) the shop holds an open auction.
package market

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
)

// Key prefixes.
const (
	PlantsPrefix   = "/vmgrid/plants/"
	AuctionsPrefix = "/vmgrid/auctions/"
	InvitesPrefix  = "/vmgrid/invites/"
	BidsPrefix     = "/vmgrid/bids/"
)

// PlantInfo is what a plant offers, refreshed while it lives.
type PlantInfo struct {
	Name string `json:"name"`
	// Addr is the plant's PlantService address.
	Addr          string   `json:"addr"`
	Arch          string   `json:"arch"`
	MemoryMiB     uint64   `json:"memory_mib"`
	MemoryFreeMiB uint64   `json:"memory_free_mib"`
	Running       int      `json:"running"`
	Domains       []string `json:"domains"`
	// Images maps golden images to the bytes of them the plant holds in
	// its caches.
	Images map[string]uint64 `json:"images,omitempty"`
}

// Auction is a request for bids.
type Auction struct {
	ID        string `json:"id"`
	Image     string `json:"image"`
	ImageSize uint64 `json:"image_size"` // bytes a cold clone would fetch at most
	Arch      string `json:"arch"`
	VCPUs     uint32 `json:"vcpus"`
	MemoryMiB uint64 `json:"memory_mib"`
	Domain    string `json:"domain"`
	Lease     int64  `json:"lease"`
	// Weights is the shop's cost function; plants price with it.
	Weights *Weights `json:"weights,omitempty"`
	// Invited names the plants that should bid; empty invites all.
	Invited []string `json:"invited,omitempty"`
}

// Invites reports whether the plant should bid in a.
func (a Auction) Invites(plant string) bool {
	return len(a.Invited) == 0 || contains(a.Invited, plant)
}

// Bid answers an auction.
type Bid struct {
	Plant   string  `json:"plant"`
	Addr    string  `json:"addr"`
	Cost    float64 `json:"cost"`
	Refusal string  `json:"refusal,omitempty"`
}

// Weights of the cost function.
type Weights struct {
	// Compute is the cost per VM already running on the plant (paper: 4).
	Compute float64 `json:"compute"`
	// Network is the one-time cost of a new host-only network for a client
	// domain the plant does not serve yet (paper: 50).
	Network float64 `json:"network"`
	// CachePerGiB lowers the bid per GiB of the image the plant already
	// holds, bytes it would not fetch (not in the paper).
	CachePerGiB float64 `json:"cache_per_gib"`
	// Memory raises the bid by this times the fraction of the plant's guest
	// memory in use after placing the VM (not in the paper).
	Memory float64 `json:"memory"`
}

// DefaultWeights reproduce VMPlants §3.4 (4 per running VM, 50 per new
// network) with the extras small enough not to change its worked example.
func DefaultWeights() Weights { return Weights{Compute: 4, Network: 50, CachePerGiB: 10, Memory: 1} }

// Cost is a plant's bid for an auction, or the reason it cannot host it.
func Cost(w Weights, p PlantInfo, a Auction) (float64, string) {
	switch {
	case a.Arch != "" && p.Arch != "" && a.Arch != p.Arch:
		return 0, fmt.Sprintf("plant %s runs %s guests, not %s", p.Name, p.Arch, a.Arch)
	case a.MemoryMiB > p.MemoryFreeMiB:
		return 0, fmt.Sprintf("plant %s has %d MiB of guest memory free, the VM needs %d", p.Name, p.MemoryFreeMiB, a.MemoryMiB)
	}
	cost := w.Compute * float64(p.Running)
	if !contains(p.Domains, a.Domain) {
		cost += w.Network
	}
	cached := p.Images[a.Image]
	if a.ImageSize > 0 {
		cached = min(cached, a.ImageSize)
	}
	cost -= w.CachePerGiB * float64(cached) / (1 << 30)
	if p.MemoryMiB > 0 {
		used := p.MemoryMiB - p.MemoryFreeMiB + a.MemoryMiB
		cost += w.Memory * float64(used) / float64(p.MemoryMiB)
	}
	return cost, ""
}

// Quote is a plant's bid for a: priced with the auction's weights (the
// shop's cost function), or with own when the auction carries none.
func Quote(own Weights, p PlantInfo, a Auction) Bid {
	if a.Weights != nil {
		own = *a.Weights
	}
	cost, refusal := Cost(own, p, a)
	return Bid{Plant: p.Name, Addr: p.Addr, Cost: cost, Refusal: refusal}
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// Register keeps a plant's PlantInfo in etcd under its session lease until
// ctx ends (then the key is removed). Every interval it looks at info() and
// writes it when it changed (and every 30 s regardless), so the shops'
// copies of the registry (Registry) lag the plant by about interval.
// The returned channel closes when the refreshing has stopped; wait for it
// before closing the session's client.
func Register(ctx context.Context, sess *concurrency.Session, info func() PlantInfo, interval time.Duration, log *zap.Logger) (<-chan struct{}, error) {
	cli := sess.Client()
	var last []byte
	lastPut := time.Now()
	put := func(force bool) error {
		pi := info()
		b, _ := json.Marshal(pi)
		if !force && string(b) == string(last) {
			return nil
		}
		if _, err := cli.Put(ctx, PlantsPrefix+pi.Name, string(b), clientv3.WithLease(sess.Lease())); err != nil {
			return err
		}
		last, lastPut = b, time.Now()
		return nil
	}
	if err := put(true); err != nil {
		return nil, fmt.Errorf("register plant: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				dctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				cli.Delete(dctx, PlantsPrefix+info().Name)
				cancel()
				return
			case <-sess.Done():
				log.Warn("etcd session of the plant ended; it no longer bids")
				return
			case <-t.C:
				if err := put(time.Since(lastPut) > 30*time.Second); err != nil && ctx.Err() == nil {
					log.Warn("refresh plant registration", zap.Error(err))
				}
			}
		}
	}()
	return done, nil
}

// StartBidder answers, until ctx ends, the open auctions and those that
// invite plant. It returns once its watches are in place, so a plant that
// registers after it never misses an auction; the returned channel closes
// when it has stopped. A plant hears of an invitation only if it is
// invited, so the work of an auction with a shortlist does not grow with
// the plants.
func StartBidder(ctx context.Context, cli *clientv3.Client, plant string, bid func(Auction) Bid, log *zap.Logger) (<-chan struct{}, error) {
	prefixes := []string{AuctionsPrefix, InvitesPrefix + plant + "/"}
	var chans []clientv3.WatchChan
	wctx, cancel := context.WithCancel(ctx)
	for _, prefix := range prefixes {
		wch, err := watchFromNow(wctx, cli, prefix)
		if err != nil {
			cancel()
			return nil, err
		}
		chans = append(chans, wch)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	for i, prefix := range prefixes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answer(wctx, cli, prefix, chans[i], plant, bid, log)
		}()
	}
	go func() {
		wg.Wait()
		cancel()
		close(done)
	}()
	return done, nil
}

// watchFromNow watches the keys under prefix and returns once etcd has
// set the watch up.
func watchFromNow(ctx context.Context, cli *clientv3.Client, prefix string) (clientv3.WatchChan, error) {
	wch := cli.Watch(clientv3.WithRequireLeader(ctx), prefix, clientv3.WithPrefix(), clientv3.WithFilterDelete(), clientv3.WithCreatedNotify())
	select {
	case resp, ok := <-wch:
		if !ok {
			return nil, fmt.Errorf("watch %s: %w", prefix, context.Cause(ctx))
		}
		if !resp.Created {
			return nil, fmt.Errorf("watch %s: %v", prefix, resp.Err())
		}
		return wch, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("watch %s: %w", prefix, ctx.Err())
	}
}

// answer bids in the auctions wch reports until ctx ends. A watch that
// ends (etcd lost its leader, or compacted) is set up again; auctions
// published in between are missed, and their shops take the other bids.
func answer(ctx context.Context, cli *clientv3.Client, prefix string, wch clientv3.WatchChan, plant string, bid func(Auction) Bid, log *zap.Logger) {
	for {
		for resp := range wch {
			if err := resp.Err(); err != nil {
				log.Warn("auction watch ended; watching again", zap.String("prefix", prefix), zap.Error(err))
				break
			}
			for _, ev := range resp.Events {
				if ev.Type != clientv3.EventTypePut || ev.Kv.Version != 1 {
					continue
				}
				var a Auction
				if err := json.Unmarshal(ev.Kv.Value, &a); err != nil || !a.Invites(plant) {
					continue
				}
				b := bid(a)
				v, _ := json.Marshal(b)
				if _, err := cli.Put(ctx, BidsPrefix+a.ID+"/"+b.Plant, string(v), clientv3.WithLease(clientv3.LeaseID(a.Lease))); err != nil && ctx.Err() == nil {
					log.Debug("bid not placed (the auction may be over)", zap.String("auction", a.ID), zap.Error(err))
				}
			}
		}
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(200 * time.Millisecond):
			}
			var err error
			if wch, err = watchFromNow(ctx, cli, prefix); err == nil {
				break
			}
			if ctx.Err() == nil {
				log.Warn("watch auctions", zap.String("prefix", prefix), zap.Error(err))
			}
		}
	}
}

// Run holds an auction: it publishes a, waits until every invited plant (or,
// when a invites all, every registered plant) has bid or the deadline
// passed, and returns the bids, candidates first by cost (ties in random
// order), refusals last.
func Run(ctx context.Context, cli *clientv3.Client, a Auction, deadline time.Duration) ([]Bid, error) {
	lease, err := cli.Grant(ctx, int64(max(deadline/time.Second, 0))+10)
	if err != nil {
		return nil, fmt.Errorf("auction lease: %w", err)
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		cli.Revoke(rctx, lease.ID) // the auction and its bids go with it
		cancel()
	}()
	a.Lease = int64(lease.ID)
	expect := int64(len(a.Invited))
	if expect == 0 {
		plants, err := cli.Get(ctx, PlantsPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return nil, fmt.Errorf("count plants: %w", err)
		}
		if expect = plants.Count; expect == 0 {
			return nil, nil
		}
	}
	b, _ := json.Marshal(a)
	wctx, cancel := context.WithTimeout(ctx, deadline)
	defer cancel()
	// Watch before publishing, from "now": a watch that starts at a past
	// revision is caught up by etcd only every 100 ms.
	wch := cli.Watch(clientv3.WithRequireLeader(wctx), BidsPrefix+a.ID+"/", clientv3.WithPrefix(), clientv3.WithCreatedNotify())
	select {
	case resp := <-wch:
		if !resp.Created {
			return nil, fmt.Errorf("watch bids: %v", resp.Err())
		}
	case <-wctx.Done():
		return nil, fmt.Errorf("watch bids: %w", wctx.Err())
	}
	var ops []clientv3.Op
	if len(a.Invited) == 0 {
		ops = append(ops, clientv3.OpPut(AuctionsPrefix+a.ID, string(b), clientv3.WithLease(lease.ID)))
	}
	for _, p := range a.Invited {
		ops = append(ops, clientv3.OpPut(InvitesPrefix+p+"/"+a.ID, string(b), clientv3.WithLease(lease.ID)))
	}
	if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
		return nil, fmt.Errorf("publish auction: %w", err)
	}
	var bids []Bid
	seen := map[string]bool{}
collect:
	for int64(len(bids)) < expect {
		select {
		case resp, ok := <-wch:
			if !ok {
				break collect
			}
			for _, ev := range resp.Events {
				var bid Bid
				if ev.Type == clientv3.EventTypePut && json.Unmarshal(ev.Kv.Value, &bid) == nil && !seen[bid.Plant] && a.Invites(bid.Plant) {
					seen[bid.Plant] = true
					bids = append(bids, bid)
				}
			}
		case <-wctx.Done():
			break collect
		}
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	Rank(bids)
	return bids, nil
}

// Rank orders bids: candidates by cost, equal costs in random order, then
// refusals.
func Rank(bids []Bid) {
	rand.Shuffle(len(bids), func(i, j int) { bids[i], bids[j] = bids[j], bids[i] })
	sort.SliceStable(bids, func(i, j int) bool {
		if (bids[i].Refusal == "") != (bids[j].Refusal == "") {
			return bids[i].Refusal == ""
		}
		return bids[i].Cost < bids[j].Cost
	})
}

// Refusals joins the reasons of refusing bids.
func Refusals(bids []Bid) string {
	var r []string
	for _, b := range bids {
		if b.Refusal != "" {
			r = append(r, b.Refusal)
		}
	}
	return strings.Join(r, "; ")
}
