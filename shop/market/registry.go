package market

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Registry is a watched copy of the plants' posted offers (PlantsPrefix).
type Registry struct {
	cli *clientv3.Client
	log *zap.Logger

	mu     sync.RWMutex
	plants map[string]PlantInfo

	cancel context.CancelFunc
	done   chan struct{}
}

// WatchRegistry loads the registry and keeps it current until Close.
func WatchRegistry(ctx context.Context, cli *clientv3.Client, log *zap.Logger) (*Registry, error) {
	r := &Registry{cli: cli, log: log, done: make(chan struct{})}
	rev, err := r.load(ctx)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go r.watch(wctx, rev)
	return r, nil
}

// load replaces the copy with etcd's and returns the revision it was read at.
func (r *Registry) load(ctx context.Context) (int64, error) {
	resp, err := r.cli.Get(ctx, PlantsPrefix, clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("read the plant registry: %w", err)
	}
	plants := decodePlants(resp.Kvs)
	r.mu.Lock()
	r.plants = plants
	r.mu.Unlock()
	return resp.Header.Revision, nil
}

func (r *Registry) watch(ctx context.Context, rev int64) {
	defer close(r.done)
	for ctx.Err() == nil {
		wch := r.cli.Watch(clientv3.WithRequireLeader(ctx), PlantsPrefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
		for resp := range wch {
			if err := resp.Err(); err != nil {
				r.log.Debug("plant registry watch", zap.Error(err))
				break // compacted or lost the leader: read it all again
			}
			r.mu.Lock()
			for _, ev := range resp.Events {
				name := strings.TrimPrefix(string(ev.Kv.Key), PlantsPrefix)
				var p PlantInfo
				if ev.Type == clientv3.EventTypeDelete || json.Unmarshal(ev.Kv.Value, &p) != nil {
					delete(r.plants, name)
				} else {
					r.plants[name] = p
				}
			}
			r.mu.Unlock()
			rev = resp.Header.Revision
		}
		for ctx.Err() == nil {
			lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			var err error
			rev, err = r.load(lctx)
			cancel()
			if err == nil {
				break
			}
			r.log.Warn("plant registry", zap.Error(err))
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// Plants returns the posted offers.
func (r *Registry) Plants() []PlantInfo {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]PlantInfo, 0, len(r.plants))
	for _, p := range r.plants {
		out = append(out, p)
	}
	return out
}

// Plant returns a plant's posted offer, if it is registered.
func (r *Registry) Plant(name string) (PlantInfo, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	p, ok := r.plants[name]
	return p, ok
}

// Len is how many plants are registered.
func (r *Registry) Len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.plants)
}

// decodePlants reads registry keys.
func decodePlants(kvs []*mvccpb.KeyValue) map[string]PlantInfo {
	plants := make(map[string]PlantInfo, len(kvs))
	for _, kv := range kvs {
		var p PlantInfo
		if json.Unmarshal(kv.Value, &p) == nil {
			plants[strings.TrimPrefix(string(kv.Key), PlantsPrefix)] = p
		}
	}
	return plants
}

// Close stops watching.
func (r *Registry) Close() {
	r.cancel()
	<-r.done
}

// Shortlist prices every plant's posted offer for a with w and returns the
// names of the k cheapest (equal prices in random order) and a refusal for
// each plant whose posted offer cannot host a. It keeps the k best in a
// heap as it goes, O(n log k): sorting every plant to take 8 of them cost
// 19 ms with 10,000 plants.
func Shortlist(w Weights, plants []PlantInfo, a Auction, k int) (invited []string, refused []Bid) {
	if k <= 0 {
		k = len(plants)
	}
	best := make(shortHeap, 0, min(k, len(plants)))
	for _, p := range plants {
		c, why := Cost(w, p, a)
		if why != "" {
			refused = append(refused, Bid{Plant: p.Name, Addr: p.Addr, Refusal: why})
			continue
		}
		best.offer(priced{name: p.Name, cost: c, tie: rand.Uint64()}, k)
	}
	slices.SortFunc(best, func(x, y priced) int {
		if x.cheaper(y) {
			return -1
		}
		if y.cheaper(x) {
			return 1
		}
		return 0
	})
	for _, c := range best {
		invited = append(invited, c.name)
	}
	return invited, refused
}

// priced is a plant with its price; tie orders equal prices at random.
type priced struct {
	name string
	cost float64
	tie  uint64
}

func (x priced) cheaper(y priced) bool { return x.cost < y.cost || x.cost == y.cost && x.tie < y.tie }

// shortHeap is a max-heap of the cheapest plants seen: its root is the
// dearest of them, the one a cheaper plant replaces.
type shortHeap []priced

// offer keeps p if it is among the k cheapest so far.
func (h *shortHeap) offer(p priced, k int) {
	if len(*h) < k {
		*h = append(*h, p)
		h.up(len(*h) - 1)
		return
	}
	if p.cheaper((*h)[0]) {
		(*h)[0] = p
		h.down(0)
	}
}

func (h shortHeap) up(i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if !h[parent].cheaper(h[i]) {
			return
		}
		h[parent], h[i] = h[i], h[parent]
		i = parent
	}
}

func (h shortHeap) down(i int) {
	for {
		l, big := 2*i+1, i
		if l < len(h) && h[big].cheaper(h[l]) {
			big = l
		}
		if r := l + 1; r < len(h) && h[big].cheaper(h[r]) {
			big = r
		}
		if big == i {
			return
		}
		h[i], h[big] = h[big], h[i]
		i = big
	}
}

// MaxShortlist bounds a shortlist: its invitations are written in one etcd
// transaction (etcd allows 128 operations in one by default).
const MaxShortlist = 100

// Place holds the auction for a: with a registry holding more than k
// plants, it invites the k whose posted offers a's weights price lowest and
// returns their bids followed by the refusals of the others; when no invited
// plant can host the VM after all (the offers were stale) it holds an open
// auction, and reports so. Without a registry, or with k ≤ 0, every plant
// bids.
func Place(ctx context.Context, cli *clientv3.Client, reg *Registry, a Auction, k int, deadline time.Duration) (bids []Bid, open bool, err error) {
	var refused []Bid
	k = min(k, MaxShortlist)
	if reg != nil && k > 0 {
		if plants := reg.Plants(); len(plants) > k {
			w := DefaultWeights()
			if a.Weights != nil {
				w = *a.Weights
			}
			a.Invited, refused = Shortlist(w, plants, a, k)
		}
	}
	if len(a.Invited) == 0 {
		bids, err = run(ctx, cli, reg, a, deadline)
		return bids, false, err
	}
	if bids, err = run(ctx, cli, reg, a, deadline); err != nil {
		return nil, false, err
	}
	if len(bids) > 0 && bids[0].Refusal == "" {
		return append(bids, refused...), false, nil
	}
	a.ID += "-open"
	a.Invited = nil
	bids, err = run(ctx, cli, reg, a, deadline)
	return bids, true, err
}
