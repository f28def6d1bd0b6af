package clonebench

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services"
)

// benchCache is the block cache geometry of every plant and cache proxy of
// the benchmark: far more than the image, so nothing is evicted.
var benchCache = gvfs.CacheConfig{Capacity: 1 << 30, Ways: 8, BlockSize: 64 << 10}

// node is an in-process compute server and a client of its PlantService.
type node struct {
	*computeserver.Server
	name   string
	cc     *grpc.ClientConn
	client computev1.PlantServiceClient
	cancel context.CancelFunc
	served chan struct{}
	once   sync.Once
}

func startNode(ctx context.Context, id identity, name, dir, upstream string, compress bool, driver vmm.Driver, log *zap.Logger, opts ...func(*computeserver.Config)) (*node, error) {
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	cfg := computeserver.Config{
		Server:   services.Options{Name: "computeserver", Listen: "127.0.0.1:0", Logger: log.Named(name), ShutdownTimeout: 5 * time.Second},
		Upstream: upstream, Compress: compress, DataDir: dir,
		Proxy: gvfs.Config{Cache: benchCache, FlushIdle: -1}, Name: name, Driver: driver,
		Tokens: id.tokens, ServiceTokenFile: id.serviceFile,
	}
	for _, o := range opts {
		o(&cfg)
	}
	pl, err := computeserver.Start(sctx, cfg)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("compute server %s: %w", name, err)
	}
	n := &node{Server: pl, name: name, cancel: cancel, served: make(chan struct{})}
	go func() { pl.Serve(sctx); close(n.served) }() //nolint:errcheck // Serve logs its own failures
	if n.cc, err = id.dial(pl.Server.Addr()); err != nil {
		n.Close()
		return nil, err
	}
	n.client = computev1.NewPlantServiceClient(n.cc)
	// A plant in service has its connection to the upstream open: open
	// this one before any clock starts (it touches no image).
	if _, err := pl.Proxy.Upstream().List(ctx); err != nil {
		n.Close()
		return nil, fmt.Errorf("compute server %s: upstream %s: %w", name, upstream, err)
	}
	return n, nil
}

// Close stops the plant: its VMs, its gRPC server and its FUSE mount.
func (n *node) Close() {
	n.once.Do(func() {
		if n.cc != nil {
			n.cc.Close()
		}
		n.cancel()
		<-n.served
	})
}

// snapshot of a plant's data plane counters.
type Plane struct {
	// Requests are ReadBlocks requests sent upstream (each a round trip,
	// pipelined with the others on one stream).
	Requests   uint64 `json:"upstream_requests"`
	BlockBytes uint64 `json:"block_bytes"`
	Prefetched uint64 `json:"prefetched_blocks"`
	// FileBytes came through the whole-file channel (uncompressed).
	FileBytes uint64 `json:"file_bytes"`
	// Working-set profile: blocks fetched from it, of those read, and
	// reads it did not hold (lazy rows).
	ProfileFetched uint64 `json:"profile_fetched_blocks,omitempty"`
	ProfileUsed    uint64 `json:"profile_used_blocks,omitempty"`
	ProfileMissed  uint64 `json:"profile_missed_blocks,omitempty"`
}

func (n *node) stats() Plane {
	s := n.Proxy.Stats()
	return Plane{s.Requests.Load(), s.FetchedBytes.Load(), s.Prefetched.Load(), n.Proxy.FileCache().Received(),
		s.ProfileFetched.Load(), s.ProfileUsed.Load(), s.ProfileMissed.Load()}
}

// clone asks the plant for a clone of image configured with a hostname and
// waits until it runs. The phases come from the plant's progress messages.
func (n *node) clone(ctx context.Context, image, hostname string, ph Phases) (*computev1.ClassAd, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	stream, err := n.client.CreateVM(ctx, &computev1.CreateVMRequest{
		Image: image, Owner: "clonebench",
		Config: &computev1.ConfigDAG{Actions: []*computev1.Action{{
			Id: "hostname", Kind: &computev1.Action_SetHostname{SetHostname: &computev1.SetHostnameAction{Hostname: hostname}},
		}}},
	})
	if err != nil {
		return nil, err
	}
	names := map[computev1.VMState]string{
		computev1.VMState_VM_STATE_FETCHING:    "fetch",
		computev1.VMState_VM_STATE_RESTORING:   "restore",
		computev1.VMState_VM_STATE_CONFIGURING: "configure",
	}
	var state computev1.VMState
	var since time.Duration
	for {
		p, err := stream.Recv()
		if err != nil {
			return nil, fmt.Errorf("clone on %s: %w", n.name, err)
		}
		at := time.Duration(p.ElapsedNanos)
		if p.State != state {
			if name := names[state]; name != "" && ph != nil {
				ph[name] += (at - since).Seconds()
			}
			state, since = p.State, at
		}
		if p.Classad != nil {
			return p.Classad, nil
		}
	}
}

func (n *node) destroy(ctx context.Context, id string) error {
	_, err := n.client.DestroyVM(ctx, &computev1.DestroyVMRequest{VmId: id})
	return err
}

// cacheProxy is an in-process cache proxy (the LAN's second-level cache).
type cacheProxy struct {
	*computeserver.CacheProxy
	cancel context.CancelFunc
	served chan struct{}
}

func startCacheProxy(ctx context.Context, id identity, dir, upstream string, compress bool, log *zap.Logger) (*cacheProxy, error) {
	cp, err := computeserver.StartCacheProxy(ctx, computeserver.CacheProxyConfig{
		Server:   services.Options{Name: "cacheproxy", Listen: "127.0.0.1:0", Logger: log.Named("cacheproxy"), ShutdownTimeout: 5 * time.Second},
		Upstream: upstream, Compress: compress, DataDir: dir, Proxy: gvfs.Config{Cache: benchCache},
		Tokens: id.tokens, ServiceTokenFile: id.serviceFile,
	})
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	c := &cacheProxy{CacheProxy: cp, cancel: cancel, served: make(chan struct{})}
	go func() { cp.Serve(sctx); close(c.served) }() //nolint:errcheck // logged by the server
	if _, err := cp.Proxy.Upstream().List(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("cache proxy: upstream %s: %w", upstream, err)
	}
	return c, nil
}

// Close stops serving; Serve then closes the proxy.
func (c *cacheProxy) Close() {
	c.cancel()
	<-c.served
}
