package market

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
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
	// Underlay is the plant's VXLAN endpoint (ADDR:PORT) and VNIs the
	// segments it has (vnet): the other plants of a domain flood there.
	Underlay string   `json:"underlay,omitempty"`
	VNIs     []uint32 `json:"vnis,omitempty"`
	// Draining is a plant that is leaving: it takes no new VMs, and the
	// shops move its running ones to other plants (shop/drain.go).
	Draining bool `json:"draining,omitempty"`
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
	case p.Draining:
		return 0, fmt.Sprintf("plant %s is draining (leaving the grid)", p.Name)
	case a.Arch != "" && p.Arch != "" && a.Arch != p.Arch:
		return 0, fmt.Sprintf("plant %s runs %s guests, not %s", p.Name, p.Arch, a.Arch)
	case a.MemoryMiB > p.MemoryFreeMiB:
		return 0, fmt.Sprintf("plant %s has %d MiB of guest memory free, the VM needs %d", p.Name, p.MemoryFreeMiB, a.MemoryMiB)
	}
	cost := w.Compute * float64(p.Running)
	// A VM of a domain the plant hosts no VM of costs making the domain's
	// segment there (bridge, VXLAN, dialer): the one-time network charge.
	// A VM without a domain needs no segment.
	if a.Domain != "" && !contains(p.Domains, a.Domain) {
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

// Run holds an auction: it publishes a, waits until every invited plant (or,
// when a invites all, every registered plant) has bid or the deadline
// passed, and returns the bids, candidates first by cost (ties in random
// order), refusals last. Only bids that are a registered plant's own quote
// count (see Valid).
func Run(ctx context.Context, cli *clientv3.Client, a Auction, deadline time.Duration) ([]Bid, error) {
	return run(ctx, cli, nil, a, deadline)
}

// run is Run with the registrations taken from reg (nil: read from etcd).
func run(ctx context.Context, cli *clientv3.Client, reg *Registry, a Auction, deadline time.Duration) ([]Bid, error) {
	lookup, count, err := registrations(ctx, cli, reg)
	if err != nil {
		return nil, err
	}
	expect := int64(len(a.Invited))
	if expect == 0 {
		if expect = count; expect == 0 {
			return nil, nil
		}
	}
	lctx, lcancel := context.WithTimeout(ctx, OpTimeout)
	lease, err := cli.Grant(lctx, int64(max(deadline/time.Second, 0))+10)
	lcancel()
	if err != nil {
		return nil, fmt.Errorf("auction lease: %w", err)
	}
	// The auction and its bids go with its lease, after the answer: a
	// revoke is an etcd write, and the placement need not wait for it (the
	// lease expires by itself should the revoke fail).
	defer func() {
		go func() {
			rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			cli.Revoke(rctx, lease.ID) //nolint:errcheck // it expires anyway
		}()
	}()
	a.Lease = int64(lease.ID)
	wctx, cancel := context.WithTimeout(ctx, deadline)
	defer cancel()
	wch, err := publish(ctx, wctx, cli, a)
	if err != nil {
		return nil, err
	}
	bids := collect(wctx, wch, a, expect, lookup)
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	Rank(bids)
	return bids, nil
}

// registrations returns how to look a plant's registration up, and how many
// plants are registered.
func registrations(ctx context.Context, cli *clientv3.Client, reg *Registry) (func(string) (PlantInfo, bool), int64, error) {
	if reg != nil {
		return reg.Plant, int64(reg.Len()), nil
	}
	gctx, cancel := context.WithTimeout(ctx, OpTimeout)
	defer cancel()
	resp, err := cli.Get(gctx, PlantsPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("read the plant registry: %w", err)
	}
	plants := decodePlants(resp.Kvs)
	return func(name string) (PlantInfo, bool) { p, ok := plants[name]; return p, ok }, int64(len(plants)), nil
}

// publish watches a's bids (from now: a watch that starts at a past
// revision is caught up by etcd only every 100 ms), then publishes a.
func publish(ctx, wctx context.Context, cli *clientv3.Client, a Auction) (clientv3.WatchChan, error) {
	wch := cli.Watch(clientv3.WithRequireLeader(wctx), BidsPrefix+a.ID+"/", clientv3.WithPrefix(), clientv3.WithCreatedNotify())
	select {
	case resp := <-wch:
		if !resp.Created {
			return nil, fmt.Errorf("watch bids: %w", resp.Err())
		}
	case <-wctx.Done():
		return nil, fmt.Errorf("watch bids: %w", wctx.Err())
	}
	b, _ := json.Marshal(a)
	lease := clientv3.WithLease(clientv3.LeaseID(a.Lease))
	var ops []clientv3.Op
	if len(a.Invited) == 0 {
		ops = append(ops, clientv3.OpPut(AuctionsPrefix+a.ID, string(b), lease))
	}
	for _, p := range a.Invited {
		ops = append(ops, clientv3.OpPut(InvitesPrefix+p+"/"+a.ID, string(b), lease))
	}
	pctx, cancel := context.WithTimeout(ctx, OpTimeout)
	defer cancel()
	if _, err := cli.Txn(pctx).Then(ops...).Commit(); err != nil {
		return nil, fmt.Errorf("publish auction: %w", err)
	}
	return wch, nil
}

// collect gathers the valid bids until expect of them came or wctx ends.
func collect(wctx context.Context, wch clientv3.WatchChan, a Auction, expect int64, lookup func(string) (PlantInfo, bool)) []Bid {
	var bids []Bid
	seen := map[string]bool{}
	for int64(len(bids)) < expect {
		select {
		case resp, ok := <-wch:
			if !ok {
				return bids
			}
			for _, ev := range resp.Events {
				var bid Bid
				if ev.Type != clientv3.EventTypePut || json.Unmarshal(ev.Kv.Value, &bid) != nil || seen[bid.Plant] || !a.Invites(bid.Plant) {
					continue
				}
				if Valid(a, string(ev.Kv.Key), bid, lookup) != nil {
					continue // not a plant's own quote: a forged or broken bid
				}
				seen[bid.Plant] = true
				bids = append(bids, bid)
			}
		case <-wctx.Done():
			return bids
		}
	}
	return bids
}

// Valid checks that a bid, found under key, is a registered plant's own
// quote for a: written under the bidding plant's own name, by a plant
// registered under that name at the address the bid names, and with a cost
// a quote can have (finite, and no lower than the cache discount allows).
// Anyone who can write to etcd can write a bid; this keeps such a bid from
// winning and from steering a user's VM to an address of its choosing.
func Valid(a Auction, key string, b Bid, lookup func(string) (PlantInfo, bool)) error {
	if key != BidsPrefix+a.ID+"/"+b.Plant {
		return fmt.Errorf("bid of %q under another plant's key %s", b.Plant, key)
	}
	p, ok := lookup(b.Plant)
	if !ok {
		return fmt.Errorf("bid of %q, which is not a registered plant", b.Plant)
	}
	if p.Addr != b.Addr {
		return fmt.Errorf("bid of %q names %s, its registration %s", b.Plant, b.Addr, p.Addr)
	}
	if b.Refusal != "" {
		return nil
	}
	if math.IsNaN(b.Cost) || math.IsInf(b.Cost, 0) || b.Cost < MinCost(a) {
		return fmt.Errorf("bid of %q costs %v, below any quote (%v)", b.Plant, b.Cost, MinCost(a))
	}
	return nil
}

// MinCost is the lowest cost a quote for a can have: every term of Cost is
// at least zero but the cache discount, which is at most the whole image.
func MinCost(a Auction) float64 {
	w := DefaultWeights()
	if a.Weights != nil {
		w = *a.Weights
	}
	return -max(w.CachePerGiB, 0)*float64(a.ImageSize)/(1<<30) - 1e-9
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
