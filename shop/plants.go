package shop

import (
	"sync"

	"google.golang.org/grpc"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services"
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
	cc, err := services.Dial(addr, p.tls, services.WithToken(p.token, p.tls))
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

// Close closes every connection.
func (p *plantPool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, cc := range p.conns {
		cc.Close()
	}
	p.conns = map[string]*grpc.ClientConn{}
}
