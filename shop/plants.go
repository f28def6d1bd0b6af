package shop

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/connectivity"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services"
)

// Reconnecting to a plant. gRPC's default reconnect backoff grows to two
// minutes, and while a connection waits in it every call fails at once:
// a plant that restarted and registered again stayed unreachable to the
// shop for as long (a destroy right after its return answered "connection
// refused"). The backoff is kept short, and a call made while the
// connection waits skips the wait: it reconnects at once and waits for the
// outcome for at most plantReconnectWait.
const (
	plantMaxBackoff    = time.Second
	plantReconnectWait = 2 * time.Second
)

// plantPool keeps one connection per plant address, for the shop's life;
// the plant's services (PlantService, CacheService) share it.
type plantPool struct {
	tls   services.TLSFiles
	token string // the shop's service token

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

func newPlantPool(tls services.TLSFiles, token string) *plantPool {
	return &plantPool{tls: tls, token: token, conns: map[string]*grpc.ClientConn{}}
}

// conn returns the connection to the plant at addr.
func (p *plantPool) conn(addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if cc := p.conns[addr]; cc != nil {
		return cc, nil
	}
	bo := backoff.DefaultConfig
	bo.MaxDelay = plantMaxBackoff
	cc, err := services.Dial(addr, p.tls, services.WithToken(p.token, p.tls),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: 5 * time.Second}),
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			reconnectNow(ctx, cc)
			return invoker(ctx, method, req, reply, cc, opts...)
		}),
		grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			reconnectNow(ctx, cc)
			return streamer(ctx, desc, cc, method, opts...)
		}))
	if err != nil {
		return nil, err
	}
	p.conns[addr] = cc
	return cc, nil
}

// get returns the client of the plant at addr.
func (p *plantPool) get(addr string) (computev1.PlantServiceClient, error) {
	cc, err := p.conn(addr)
	if err != nil {
		return nil, err
	}
	return computev1.NewPlantServiceClient(cc), nil
}

// cache returns the client of the cache service of the plant at addr.
func (p *plantPool) cache(addr string) (computev1.CacheServiceClient, error) {
	cc, err := p.conn(addr)
	if err != nil {
		return nil, err
	}
	return computev1.NewCacheServiceClient(cc), nil
}

// reconnectNow ends the reconnect backoff of a connection that failed
// (a call would fail at once while it lasts) and waits, within ctx and
// plantReconnectWait, for the new attempt's outcome. A plant that is back
// is reached; one that is still down answers Unavailable a moment later.
func reconnectNow(ctx context.Context, cc *grpc.ClientConn) {
	if cc.GetState() != connectivity.TransientFailure {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, plantReconnectWait)
	defer cancel()
	cc.ResetConnectBackoff()
	for {
		s := cc.GetState()
		switch s {
		case connectivity.Ready, connectivity.Shutdown:
			return
		case connectivity.Idle:
			cc.Connect()
		}
		if !cc.WaitForStateChange(ctx, s) {
			return
		}
		if s == connectivity.Connecting && cc.GetState() == connectivity.TransientFailure {
			return // the new attempt failed: the plant is still down
		}
	}
}

// Close closes every connection.
func (p *plantPool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, cc := range p.conns {
		cc.Close()
	}
	p.conns = map[string]*grpc.ClientConn{}
}
