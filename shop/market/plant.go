package market

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
)

// The plant's side of the market: its registration and its bidder. Both
// outlive etcd outages: the registration moves to a new session when its
// session ends, and the bidder watches again when its watches end.

// Register keeps a plant's PlantInfo in etcd under a session lease until
// ctx ends (then the key is removed). Every interval it looks at info() and
// writes it when it changed (and every 30 s regardless), so the shops'
// copies of the registry (Registry) lag the plant by about interval.
//
// sess is the caller's (it closes it); when sess ends — etcd was away for
// longer than its TTL — Register grants a lease of the same TTL itself and
// registers again under it, so a plant bids again once etcd is back.
// The returned channel closes when the refreshing has stopped; wait for it
// before closing the session's client.
func Register(ctx context.Context, sess *concurrency.Session, info func() PlantInfo, interval time.Duration, log *zap.Logger) (<-chan struct{}, error) {
	r := &registration{ls: adopt(ctx, sess), info: info, log: log}
	if err := r.put(ctx, true); err != nil {
		return nil, fmt.Errorf("register plant: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.run(ctx, interval)
	}()
	return done, nil
}

// registration is a plant's key in the registry.
type registration struct {
	ls   *Session
	info func() PlantInfo
	log  *zap.Logger

	last    []byte
	lastPut time.Time
	sess    *concurrency.Session // the session of the last write
}

// put writes the plant's offer if it changed, if force, or if the session
// is a new one (the key must move to the new lease).
func (r *registration) put(ctx context.Context, force bool) error {
	sess, err := r.ls.Get(ctx)
	if err != nil {
		return err
	}
	pi := r.info()
	b, _ := json.Marshal(pi)
	if !force && sess == r.sess && string(b) == string(r.last) {
		return nil
	}
	pctx, cancel := context.WithTimeout(ctx, OpTimeout)
	defer cancel()
	if _, err := sess.Client().Put(pctx, PlantsPrefix+pi.Name, string(b), clientv3.WithLease(sess.Lease())); err != nil {
		if IsLeaseLost(err) {
			r.ls.Lost(sess)
		}
		return err
	}
	if r.sess != nil && sess != r.sess {
		r.log.Info("plant registered again under a new etcd session", zap.String("plant", pi.Name))
	}
	r.last, r.lastPut, r.sess = b, time.Now(), sess
	return nil
}

// run refreshes the registration until ctx ends, then removes it.
func (r *registration) run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var failing bool
	for {
		// A session that ends is noticed at once, unless the last write
		// failed (then retry at most every second, not in a busy loop).
		var ended <-chan struct{}
		var retry <-chan time.Time
		if failing {
			retry = time.After(min(interval, time.Second))
		} else {
			ended = r.sess.Done()
		}
		select {
		case <-ctx.Done():
			r.leave()
			return
		case <-ended:
		case <-retry:
		case <-t.C:
		}
		err := r.put(ctx, time.Since(r.lastPut) > 30*time.Second)
		if err != nil && ctx.Err() == nil && !failing {
			r.log.Warn("plant registration lapsed (etcd unreachable?); registering again when it is back", zap.Error(err))
		}
		failing = err != nil
	}
}

// leave removes the plant from the registry and revokes the leases made here.
func (r *registration) leave() {
	dctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	r.ls.cli.Delete(dctx, PlantsPrefix+r.info().Name)
	cancel()
	r.ls.Close()
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
			b := bidder{cli: cli, prefix: prefix, plant: plant, bid: bid, log: log}
			b.answer(wctx, chans[i])
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
			return nil, fmt.Errorf("watch %s: %w", prefix, resp.Err())
		}
		return wch, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("watch %s: %w", prefix, ctx.Err())
	}
}

// bidder answers the auctions under one prefix.
type bidder struct {
	cli    *clientv3.Client
	prefix string
	plant  string
	bid    func(Auction) Bid
	log    *zap.Logger
}

// answer bids in the auctions wch reports until ctx ends. A watch that
// ends (etcd lost its leader, or compacted, or was away) is set up again;
// auctions published in between are missed, and their shops take the
// other bids.
func (b *bidder) answer(ctx context.Context, wch clientv3.WatchChan) {
	for {
		for resp := range wch {
			if err := resp.Err(); err != nil {
				b.log.Warn("auction watch ended; watching again", zap.String("prefix", b.prefix), zap.Error(err))
				break
			}
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypePut && ev.Kv.Version == 1 {
					b.answerOne(ctx, ev.Kv.Value)
				}
			}
		}
		if wch = b.rewatch(ctx); wch == nil {
			return
		}
	}
}

// answerOne places the plant's bid in one auction.
func (b *bidder) answerOne(ctx context.Context, value []byte) {
	var a Auction
	if err := json.Unmarshal(value, &a); err != nil || !a.Invites(b.plant) {
		return
	}
	bid := b.bid(a)
	v, _ := json.Marshal(bid)
	pctx, cancel := context.WithTimeout(ctx, OpTimeout)
	defer cancel()
	if _, err := b.cli.Put(pctx, BidsPrefix+a.ID+"/"+bid.Plant, string(v), clientv3.WithLease(clientv3.LeaseID(a.Lease))); err != nil && ctx.Err() == nil {
		b.log.Debug("bid not placed (the auction may be over)", zap.String("auction", a.ID), zap.Error(err))
	}
}

// rewatch sets the watch up again, retrying until ctx ends (then nil).
func (b *bidder) rewatch(ctx context.Context) clientv3.WatchChan {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
		wch, err := watchFromNow(ctx, b.cli, b.prefix)
		if err == nil {
			return wch
		}
		if ctx.Err() == nil {
			b.log.Warn("watch auctions", zap.String("prefix", b.prefix), zap.Error(err))
		}
	}
}
