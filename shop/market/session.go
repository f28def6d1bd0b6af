package market

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// OpTimeout bounds every etcd call of the market and the shop: etcd's
// client waits for a connection as long as its context lets it, so a call
// without a deadline hangs for the whole of an outage.
const OpTimeout = 3 * time.Second

// ClientConfig is the etcd client configuration of plants and shops. gRPC's
// default reconnect backoff grows to two minutes, so a client took that long
// to notice etcd was back; here it is capped at a second, and keepalives
// notice a dead etcd within seconds.
func ClientConfig(endpoints []string, log *zap.Logger) clientv3.Config {
	return clientv3.Config{
		Endpoints: endpoints, DialTimeout: 5 * time.Second,
		DialKeepAliveTime: 2 * time.Second, DialKeepAliveTimeout: 2 * time.Second,
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: 2 * time.Second,
		})},
		Logger: log,
	}
}

// Session is an etcd session that outlives etcd outages. A
// concurrency.Session ends for good once its keepalives go unanswered for
// its TTL (an outage of a few seconds); Session then grants a new lease the
// next time it is asked for one, so what hangs off it (a plant's
// registration, a shop's claims) can be written again.
type Session struct {
	cli *clientv3.Client
	ttl int

	mu    sync.Mutex
	cur   *concurrency.Session
	owned bool // cur was made here, so Close revokes it
}

// NewSession grants a lease of ttl seconds now and keeps one until Close.
func NewSession(ctx context.Context, cli *clientv3.Client, ttl int) (*Session, error) {
	s := &Session{cli: cli, ttl: ttl}
	if _, err := s.Get(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// adopt wraps a session the caller made and closes; its successors are the
// Session's own.
func adopt(ctx context.Context, sess *concurrency.Session) *Session {
	ttl := 5
	tctx, cancel := context.WithTimeout(ctx, OpTimeout)
	defer cancel()
	if resp, err := sess.Client().TimeToLive(tctx, sess.Lease()); err == nil && resp.GrantedTTL > 0 {
		ttl = int(resp.GrantedTTL)
	}
	return &Session{cli: sess.Client(), ttl: ttl, cur: sess}
}

// Get returns a live session: the current one, or a new one when it ended.
func (s *Session) Get(ctx context.Context) (*concurrency.Session, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != nil {
		select {
		case <-s.cur.Done():
			s.drop()
		default:
			return s.cur, nil
		}
	}
	gctx, cancel := context.WithTimeout(ctx, OpTimeout)
	defer cancel()
	lease, err := s.cli.Grant(gctx, int64(s.ttl))
	if err != nil {
		return nil, fmt.Errorf("etcd lease: %w", err)
	}
	sess, err := concurrency.NewSession(s.cli, concurrency.WithLease(lease.ID), concurrency.WithTTL(s.ttl))
	if err != nil {
		return nil, fmt.Errorf("etcd session: %w", err)
	}
	s.cur, s.owned = sess, true
	return sess, nil
}

// Lost tells the Session that etcd no longer knows sess's lease (a write
// under it answered "requested lease not found"): the next Get grants anew.
func (s *Session) Lost(sess *concurrency.Session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == sess {
		s.drop()
	}
}

// drop forgets cur; its keepalives stop (the lease is gone or going).
func (s *Session) drop() {
	if s.owned {
		s.cur.Orphan()
	}
	s.cur, s.owned = nil, false
}

// Close revokes the session's lease if it made it.
func (s *Session) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != nil && s.owned {
		s.cur.Close()
	}
	s.cur, s.owned = nil, false
}

// IsLeaseLost reports an etcd error saying a write's lease is gone.
func IsLeaseLost(err error) bool {
	return errors.Is(err, rpctypes.ErrLeaseNotFound) || err != nil && strings.Contains(err.Error(), rpctypes.ErrLeaseNotFound.Error())
}
