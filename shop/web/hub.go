package web

import (
	"context"
	"encoding/json"
	"sync"
	"time"

	"go.uber.org/zap"
)

// maxSamples bounds the cache statistics kept for the plots (at the
// default interval, five minutes).
const maxSamples = 150

// hub is the one watch of etcd and the one poller of the plants' caches
// that every open events stream shares.
type hub struct {
	src      Source
	log      *zap.Logger
	interval time.Duration

	mu      sync.Mutex
	subs    map[*subscriber]struct{}
	won     map[string]int  // auctions won per plant, since the hub started
	pending map[string]bool // VMs whose auctions await their winner
	samples [][]byte        // cache statistics, oldest first

	done      chan struct{} // closed by close: streams end
	closeOnce sync.Once
	cancel    context.CancelFunc
	wg        sync.WaitGroup
}

// subscriber is one events stream.
type subscriber struct {
	dirty  chan struct{} // capacity 1: an overview is due
	events chan event    // bids, wins, stats; dropped when the stream lags
}

type event struct {
	name string
	data []byte
}

func startHub(src Source, interval time.Duration, log *zap.Logger) *hub {
	ctx, cancel := context.WithCancel(context.Background())
	h := &hub{src: src, log: log, interval: interval, subs: map[*subscriber]struct{}{}, won: map[string]int{},
		pending: map[string]bool{}, done: make(chan struct{}), cancel: cancel}
	h.wg.Add(2)
	go h.watch(ctx)
	go h.poll(ctx)
	return h
}

func (h *hub) close() {
	h.closeOnce.Do(func() {
		close(h.done)
		h.cancel()
		h.wg.Wait()
	})
}

// watch follows the VM information system, again after a failed watch
// (which may have missed changes: every stream refreshes).
func (h *hub) watch(ctx context.Context) {
	defer h.wg.Done()
	for ctx.Err() == nil {
		err := h.src.Watch(ctx, h.changed)
		if ctx.Err() != nil {
			return
		}
		h.log.Warn("watching the VM information system failed; watching again", zap.Error(err))
		h.markDirty()
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// changed hands a change to every stream: bids as they are, the rest as
// a due overview. A VM record that names a plant after bids for it is the
// auction's result.
func (h *hub) changed(ch Change) {
	switch ch.Kind {
	case ChangeBid:
		h.mu.Lock()
		h.pending[ch.VMID] = true
		h.mu.Unlock()
		h.send("bid", map[string]any{"auction": ch.Auction, "vm": ch.VMID, "plant": ch.Bid.Plant,
			"cost": ch.Bid.Cost, "refusal": ch.Bid.Refusal, "at": time.Now().UnixMilli()})
		return
	case ChangeVM:
		h.mu.Lock()
		won := ch.Plant != "" && h.pending[ch.VMID]
		if won {
			delete(h.pending, ch.VMID)
			h.won[ch.Plant]++
		}
		h.mu.Unlock()
		if won {
			h.send("won", map[string]any{"vm": ch.VMID, "plant": ch.Plant, "at": time.Now().UnixMilli()})
		}
	}
	h.markDirty()
}

func (h *hub) markDirty() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		select {
		case s.dirty <- struct{}{}:
		default:
		}
	}
}

func (h *hub) send(name string, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		h.log.Warn("encode an event", zap.String("event", name), zap.Error(err))
		return
	}
	h.broadcast(event{name, data})
}

func (h *hub) broadcast(ev event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		select {
		case s.events <- ev:
		default:
		}
	}
}

// subscribe adds a stream; it gets the statistics kept so far.
func (h *hub) subscribe() (*subscriber, [][]byte) {
	s := &subscriber{dirty: make(chan struct{}, 1), events: make(chan event, 64)}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.subs[s] = struct{}{}
	return s, append([][]byte(nil), h.samples...)
}

func (h *hub) unsubscribe(s *subscriber) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.subs, s)
}

// wins returns the auctions won per plant.
func (h *hub) wins() map[string]int {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make(map[string]int, len(h.won))
	for k, v := range h.won {
		out[k] = v
	}
	return out
}

// poll asks the plants' caches every interval while a stream is open.
func (h *hub) poll(ctx context.Context) {
	defer h.wg.Done()
	t := time.NewTicker(h.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		h.mu.Lock()
		idle := len(h.subs) == 0
		h.mu.Unlock()
		if !idle {
			h.sample(ctx)
		}
	}
}

// sample records and sends one round of the plants' cache statistics.
func (h *hub) sample(ctx context.Context) {
	plants := map[string]json.RawMessage{}
	for _, p := range h.src.Plants() {
		sctx, cancel := context.WithTimeout(ctx, h.interval)
		st, err := h.src.CacheStats(sctx, p.Addr)
		cancel()
		if err != nil {
			h.log.Debug("cache statistics", zap.String("plant", p.Name), zap.Error(err))
			continue
		}
		if b, err := jsonOpts.Marshal(st); err == nil {
			plants[p.Name] = b
		}
	}
	data, err := json.Marshal(map[string]any{"at": time.Now().UnixMilli(), "plants": plants})
	if err != nil {
		return
	}
	h.mu.Lock()
	h.samples = append(h.samples, data)
	if len(h.samples) > maxSamples {
		h.samples = h.samples[len(h.samples)-maxSamples:]
	}
	h.mu.Unlock()
	h.broadcast(event{"stats", data})
}
