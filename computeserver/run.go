package computeserver

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/shop/market"
)

// Config is what `vmgrid computeserver` needs.
type Config struct {
	Server services.Options
	// Upstream is the image server or a cache proxy.
	Upstream    string
	UpstreamTLS services.TLSFiles
	// Compress asks the upstream for zstd-compressed blocks (for slow links).
	Compress bool
	// DataDir holds the caches (DataDir/cache) and the mount (DataDir/mnt
	// unless Mountpoint is set).
	DataDir    string
	Mountpoint string
	Cache      gvfs.CacheConfig
	FlushIdle  time.Duration
	ReadAhead  int
	// Name of the plant in classads (default: the listen address).
	Name string
	// GuestMemoryMiB is what guests may use in all (0: 80% of RAM).
	GuestMemoryMiB uint64
	// Driver runs the guests (nil: QEMU with TCG).
	Driver vmm.Driver
	// Etcd endpoints: when set the plant registers there and bids in the
	// shop's auctions.
	Etcd []string
	// Weights price an auction that carries no cost function of its own
	// (shops send theirs).
	Weights market.Weights
	// DataServer is the data server of stage-in and stage-out (requests
	// bring task credentials for it; they cannot name another).
	DataServer string
}

// Plant is a running compute server.
type Plant struct {
	Server     *services.Server
	Proxy      *gvfs.Proxy
	Plant      *plant.Plant
	Mountpoint string
	log        *zap.Logger
	market     func() // stops registration and bidding
}

// Start opens the caches, writes back dirty blocks left by a previous run,
// mounts the FUSE view and starts the gRPC server.
func Start(ctx context.Context, cfg Config) (*Plant, error) {
	log := cfg.Server.Logger
	if log == nil {
		log = zap.NewNop()
	}
	up, err := gvfs.DialUpstream(cfg.Upstream, cfg.UpstreamTLS, cfg.Compress)
	if err != nil {
		return nil, err
	}
	p, err := gvfs.New(gvfs.Config{
		Upstream: up, Dir: filepath.Join(cfg.DataDir, "cache"), Cache: cfg.Cache,
		FlushIdle: cfg.FlushIdle, ReadAhead: cfg.ReadAhead, Logger: log,
	})
	if err != nil {
		up.Close()
		return nil, err
	}
	fail := func(err error) (*Plant, error) {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		p.Close(cctx)
		up.Close()
		return nil, err
	}
	if flushed, err := p.FlushAll(ctx); err != nil {
		log.Warn("write-back of dirty blocks from the previous run failed; they stay dirty", zap.Error(err))
	} else if len(flushed) > 0 {
		log.Info("wrote back dirty blocks from the previous run", zap.Int("disks", len(flushed)))
	}
	mnt := cfg.Mountpoint
	if mnt == "" {
		mnt = filepath.Join(cfg.DataDir, "mnt")
	}
	if _, err := gvfs.Mount(mnt, p, gvfs.MountOptions{}); err != nil {
		return fail(err)
	}
	name := cfg.Name
	if name == "" {
		host, _ := os.Hostname()
		name = host + "-" + filepath.Base(filepath.Clean(cfg.DataDir))
	}
	driver := cfg.Driver
	if driver == nil {
		driver = &vmm.QEMU{Logger: log}
	}
	pl, err := plant.New(plant.Config{
		Name: name, Dir: filepath.Join(cfg.DataDir, "vms"), Mountpoint: mnt, Proxy: p,
		Driver: driver, MemoryMiB: cfg.GuestMemoryMiB, Logger: log, DataServer: cfg.DataServer, DataTLS: cfg.Server.TLS,
	})
	if err != nil {
		return fail(err)
	}
	srv, err := services.NewServer(cfg.Server, func(gs *grpc.Server, reg prometheus.Registerer) error {
		computev1.RegisterCacheServiceServer(gs, &cacheService{p: p})
		computev1.RegisterPlantServiceServer(gs, &plantService{p: pl, images: up.Client})
		return p.RegisterMetrics(reg)
	})
	if err != nil {
		return fail(fmt.Errorf("compute server: %w", err))
	}
	log.Info("FUSE view mounted", zap.String("mountpoint", mnt), zap.String("upstream", cfg.Upstream))
	out := &Plant{Server: srv, Proxy: p, Plant: pl, Mountpoint: mnt, log: log, market: func() {}}
	if len(cfg.Etcd) > 0 {
		stop, err := joinMarket(cfg, srv.Addr(), pl, log)
		if err != nil {
			srv.Shutdown()
			pl.Close(ctx)
			return fail(err)
		}
		out.market = stop
	}
	return out, nil
}

// Serve serves until ctx ends; SIGUSR1 flushes every dirty disk (as in the
// GVFS paper, middleware signals the proxy to write back). At the end the
// view is unmounted and dirty disks are written back.
func (pl *Plant) Serve(ctx context.Context) error {
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-usr1:
				pl.log.Info("SIGUSR1: writing back every dirty disk")
				if _, err := pl.Proxy.FlushAll(ctx); err != nil {
					pl.log.Warn("write-back failed", zap.Error(err))
				}
			}
		}
	}()
	err := pl.Server.Serve(ctx)
	pl.Close()
	return err
}

// Close stops serving, stops the VMs, unmounts the view and writes back
// dirty disks.
func (pl *Plant) Close() {
	pl.market()
	pl.Server.Shutdown()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pl.Plant.Close(ctx)
	if err := pl.Proxy.Close(ctx); err != nil {
		pl.log.Warn("closing the data plane", zap.Error(err))
	}
	pl.Proxy.Upstream().Close()
}

// Run starts a compute server and serves until ctx ends.
func Run(ctx context.Context, cfg Config) error {
	pl, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	return pl.Serve(ctx)
}

// joinMarket registers the plant in etcd under a session lease and answers
// the shop's auctions with the cost function's bids.
func joinMarket(cfg Config, addr string, pl *plant.Plant, log *zap.Logger) (func(), error) {
	cli, err := clientv3.New(clientv3.Config{Endpoints: cfg.Etcd, DialTimeout: 5 * time.Second,
		Logger: services.Quieter(log.Named("etcd-client"), zap.WarnLevel)})
	if err != nil {
		return nil, fmt.Errorf("etcd %v: %w", cfg.Etcd, err)
	}
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	if err != nil {
		cli.Close()
		return nil, fmt.Errorf("etcd session: %w", err)
	}
	w := cfg.Weights
	if w == (market.Weights{}) {
		w = market.DefaultWeights()
	}
	info := func() market.PlantInfo {
		o := pl.Offer()
		return market.PlantInfo{Name: o.Name, Addr: addr, Arch: "x86_64", MemoryMiB: o.MemoryMiB, MemoryFreeMiB: o.FreeMiB,
			Running: o.Running, Domains: o.Domains, Images: o.Images}
	}
	ctx, cancel := context.WithCancel(context.Background())
	// Bidding first: a shop that sees the plant registered gets its bids.
	done, err := market.StartBidder(ctx, cli, pl.Offer().Name, func(a market.Auction) market.Bid {
		return market.Quote(w, info(), a)
	}, log)
	if err != nil {
		cancel()
		sess.Close()
		cli.Close()
		return nil, fmt.Errorf("etcd: %w", err)
	}
	registered, err := market.Register(ctx, sess, info, 100*time.Millisecond, log)
	if err != nil {
		cancel()
		<-done
		sess.Close()
		cli.Close()
		return nil, err
	}
	log.Info("plant joined the market", zap.Strings("etcd", cfg.Etcd), zap.String("addr", addr))
	return func() {
		cancel()
		<-done
		<-registered
		sess.Close() // revokes the lease: the plant leaves the registry now
		cli.Close()
	}, nil
}
