package shop

import (
	"sync"

	"google.golang.org/grpc"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services"
)

// plantPool keeps one connection per plant address, for the shop's life.
type plantPool struct {
	tls   services.TLSFiles
	token string // the shop's service token

	mu      sync.Mutex
	clients map[string]computev1.PlantServiceClient
	conns   []*grpc.ClientConn
}

func newPlantPool(tls services.TLSFiles, token string) *plantPool {
	return &plantPool{tls: tls, token: token, clients: map[string]computev1.PlantServiceClient{}}
}

// get returns the client of the plant at addr.
func (p *plantPool) get(addr string) (computev1.PlantServiceClient, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c := p.clients[addr]; c != nil {
		return c, nil
	}
	cc, err := services.Dial(addr, p.tls, services.WithToken(p.token, p.tls))
	if err != nil {
		return nil, err
	}
	p.conns = append(p.conns, cc)
	c := computev1.NewPlantServiceClient(cc)
	p.clients[addr] = c
	return c, nil
}

// Close closes every connection.
func (p *plantPool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, cc := range p.conns {
		cc.Close()
	}
	p.conns, p.clients = nil, map[string]computev1.PlantServiceClient{}
}
