package computeserver

import (
	"cmp"
	"context"
	"encoding/json"
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
	"github.com/vmgrid/vmgrid/computeserver/gvfs/fuseview"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/computeserver/vnet"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
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
	// Proxy is the data plane: cache geometry, read-ahead, write-back on
	// idle, how long reads wait for an absent upstream (its Upstream, Dir
	// and Logger are set by Start).
	Proxy gvfs.Config
	// Name of the plant in classads (default: HOST-BASE, BASE the last
	// element of DataDir).
	Name string
	// GuestMemoryMiB is what guests may use in all (0: 80% of RAM; give
	// each of several plants on one host its share).
	GuestMemoryMiB uint64
	// GuestTimeout bounds a stock image's cold boot until its guest is
	// configured (0: plant.DefaultGuestTimeout).
	GuestTimeout time.Duration
	// Driver runs the guests (nil: QEMU with TCG).
	Driver vmm.Driver
	// Etcd: with endpoints the plant registers there and bids in the
	// shop's auctions.
	Etcd services.EtcdConfig
	// Weights price an auction that carries no cost function of its own
	// (shops send theirs).
	Weights market.Weights
	// DataServer is the data server of stage-in and stage-out (requests
	// bring task credentials for it; they cannot name another).
	DataServer string
	// TokensFile maps bearer tokens to callers; Tokens may be given
	// instead. One is required: the plant takes orders only from services
	// (the shop) and operators (auth.PlantPolicy).
	TokensFile string
	Tokens     *auth.Tokens
	// ServiceTokenFile holds the plant's token for its upstream (role
	// service there): write-back and profiles need one.
	ServiceTokenFile string
	// AgentTimeout bounds the wait for a clone's guest agent (0:
	// plant.DefaultAgentTimeout).
	AgentTimeout time.Duration
	// Network: the guests' segments (network.go, vnet).
	Network vnet.Config
	// Advertise is the HOST:PORT the shop reaches the plant at, registered
	// in etcd (empty: the listen address; set it when listening on
	// 0.0.0.0, e.g. in a container).
	Advertise string
	// MemoryRestore is lazy, eager or auto (empty: auto): how clones of
	// images with a RAM file get the guest's memory (plant/lazymem.go).
	MemoryRestore string
	// HydrateAfter is how long after a lazy clone is ready the plant
	// starts fetching the rest of its RAM (0: plant.DefaultHydrateAfter).
	HydrateAfter time.Duration
	// MemoryReadAhead is the kernel's read-ahead on the view guests map
	// their RAM files from (MOUNTPOINT-mem): what one page fault brings
	// (0: DefaultMemoryReadAhead).
	MemoryReadAhead int
	// DrainTimeout bounds how long a plant asked to stop (its context
	// ended: SIGTERM, SIGINT) waits, draining, for the shops to move its
	// running VMs to other plants before it stops the rest (they are then
	// listed lost). 0: stop at once, as without a market.
	DrainTimeout time.Duration
}

// DefaultDrainTimeout is --drain-timeout's default: a few live migrations
// of small guests one after the other, under the compose grid's and the
// systemd unit's stop grace periods (deploy/).
const DefaultDrainTimeout = 2 * time.Minute

// DefaultMemoryReadAhead is what a lazy guest's page fault reads around
// the page. Measured on the tiny guest (loopback, fetched before ready /
// demand requests): 8 MiB (the main view's) 80 MB; 1 MiB 57 MB / 133;
// 64 KiB 31 MB / 386. Bytes against round trips: in between.
const DefaultMemoryReadAhead = 256 << 10

// Server is a running compute server: the data plane (Proxy, mounted at
// Mountpoint, and at MemoryMountpoint for guests' RAM files) and the
// plant's production line (Line).
type Server struct {
	*services.Role
	Proxy                        *gvfs.Proxy
	Line                         *plant.Plant
	Mountpoint, MemoryMountpoint string
	log                          *zap.Logger
	drain                        time.Duration // Config.DrainTimeout, 0 without a market
	// others counts the registered plants, other than this one, that are
	// not draining: where its VMs could go.
	others func(context.Context) (int, error)
}

// MemoryMountpoint is where the view of guests' RAM files is mounted
// beside the view at mnt: MOUNTPOINT-mem. Whatever unmounts a compute
// server's view after it was killed must unmount this one too.
func MemoryMountpoint(mnt string) string { return mnt + "-mem" }

// closeTimeout bounds stopping the VMs and writing dirty disks back.
const closeTimeout = time.Minute

// Start opens the caches, writes back dirty blocks left by a previous run,
// mounts the FUSE view, starts the production line and the gRPC server and
// joins the market; serve with Serve, stop with Close.
func Start(ctx context.Context, cfg Config) (_ *Server, err error) {
	var undo services.Undo
	defer undo.OnError(&err)
	log := services.LoggerOr(cfg.Server.Logger)
	tokens, err := services.ServerTokens(cfg.Tokens, cfg.TokensFile, "the compute server")
	if err != nil {
		return nil, err
	}
	p, err := openProxy(ctx, cfg, log, &undo)
	if err != nil {
		return nil, err
	}
	mnt := cfg.Mountpoint
	if mnt == "" {
		mnt = filepath.Join(cfg.DataDir, "mnt")
	}
	if _, err := fuseview.Mount(mnt, p, fuseview.MountOptions{Logger: log}); err != nil {
		return nil, err // closing the proxy unmounts
	}
	// A second view for guest RAM files, with the small read-ahead a page
	// fault should pull in (plant/lazymem.go).
	memMnt, ra := MemoryMountpoint(mnt), cfg.MemoryReadAhead
	if ra == 0 {
		ra = DefaultMemoryReadAhead
	}
	if _, err := fuseview.Mount(memMnt, p, fuseview.MountOptions{Logger: log, ReadAheadKB: max(4, ra>>10)}); err != nil {
		return nil, err
	}
	pl, err := startLine(cfg, mnt, memMnt, p, log)
	if err != nil {
		return nil, err
	}
	undo.Push(func() {
		cctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		pl.Close(cctx)
	})
	opts := cfg.Server.Authenticated(&auth.Authenticator{Tokens: tokens, Policy: auth.PlantPolicy()})
	srv, err := services.NewServer(opts, func(gs *grpc.Server, reg prometheus.Registerer) error {
		computev1.RegisterCacheServiceServer(gs, &cacheService{p: p})
		computev1.RegisterPlantServiceServer(gs, &plantService{p: pl, images: p.Upstream().Client})
		return p.RegisterMetrics(reg)
	})
	if err != nil {
		return nil, fmt.Errorf("compute server: %w", err)
	}
	undo.Push(srv.Shutdown)
	log.Info("FUSE view mounted", zap.String("mountpoint", mnt), zap.String("upstream", cfg.Upstream))
	s := &Server{Proxy: p, Line: pl, Mountpoint: mnt, MemoryMountpoint: memMnt, log: log}
	if len(cfg.Etcd.Endpoints) > 0 {
		stop, others, err := joinMarket(cfg, cmp.Or(cfg.Advertise, srv.Addr()), pl, log)
		if err != nil {
			return nil, err
		}
		undo.Push(stop)
		s.drain, s.others = cfg.DrainTimeout, others
	}
	s.Role = services.NewRole(srv, &undo)
	return s, nil
}

// openProxy dials the upstream and opens the caches (pushing their closing
// on undo), then writes back what a previous run left dirty.
func openProxy(ctx context.Context, cfg Config, log *zap.Logger, undo *services.Undo) (*gvfs.Proxy, error) {
	up, err := dialUpstream(cfg.Upstream, cfg.UpstreamTLS, cfg.Compress, cfg.ServiceTokenFile, undo)
	if err != nil {
		return nil, err
	}
	pc := cfg.Proxy
	pc.Upstream, pc.Dir, pc.Logger = up, filepath.Join(cfg.DataDir, "cache"), log
	p, err := gvfs.New(pc)
	if err != nil {
		return nil, err
	}
	undo.Push(func() {
		cctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		if err := p.Close(cctx); err != nil {
			log.Warn("closing the data plane", zap.Error(err))
		}
	})
	if flushed, err := p.FlushAll(ctx); err != nil {
		log.Warn("write-back of dirty blocks from the previous run failed; they stay dirty", zap.Error(err))
	} else if len(flushed) > 0 {
		log.Info("wrote back dirty blocks from the previous run", zap.Int("disks", len(flushed)))
	}
	return p, nil
}

// dialUpstream dials the upstream as this service (the token in
// tokenFile) and pushes closing it on undo.
func dialUpstream(addr string, tls services.TLSFiles, compress bool, tokenFile string, undo *services.Undo) (*gvfs.Upstream, error) {
	token, err := services.ServiceToken(tokenFile)
	if err != nil {
		return nil, err
	}
	up, err := gvfs.DialUpstream(addr, tls, compress, services.WithToken(token, tls))
	if err != nil {
		return nil, err
	}
	undo.Push(func() { up.Close() })
	return up, nil
}

// startLine starts the plant's production line over the view at mnt.
func startLine(cfg Config, mnt, memMnt string, p *gvfs.Proxy, log *zap.Logger) (*plant.Plant, error) {
	name := cfg.Name
	if name == "" {
		host, _ := os.Hostname()
		name = host + "-" + filepath.Base(filepath.Clean(cfg.DataDir))
	}
	driver := cfg.Driver
	if driver == nil {
		driver = &vmm.QEMU{Logger: log}
	}
	restore, err := plant.ParseMemoryRestore(cfg.MemoryRestore)
	if err != nil {
		return nil, fmt.Errorf("--memory-restore: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	nm, err := openNetwork(cfg, name, log)
	if err != nil {
		return nil, err
	}
	pl, err := plant.New(plant.Config{
		Name: name, Dir: filepath.Join(cfg.DataDir, "vms"), Mountpoint: mnt, MemoryMountpoint: memMnt, Proxy: p,
		Driver: driver, MemoryMiB: cfg.GuestMemoryMiB, GuestTimeout: cfg.GuestTimeout, Logger: log, DataServer: cfg.DataServer, DataTLS: cfg.Server.TLS,
		AgentTimeout: cfg.AgentTimeout, MemoryRestore: restore, HydrateAfter: cfg.HydrateAfter,
		Network: nm, DialPlant: peerDialer(cfg),
	})
	if err != nil && nm != nil {
		nm.Close()
	}
	return pl, err
}

// peerDialer connects to other plants with the plant's service token
// (live migration's calls between plants); nil without one.
func peerDialer(cfg Config) func(addr string) (*grpc.ClientConn, error) {
	token, err := services.ServiceToken(cfg.ServiceTokenFile)
	if err != nil || token == "" {
		return nil
	}
	return func(addr string) (*grpc.ClientConn, error) {
		return services.Dial(addr, cfg.Server.TLS, services.WithToken(token, cfg.Server.TLS))
	}
}

// Serve serves until ctx ends; SIGUSR1 flushes every dirty disk (as in the
// GVFS paper, middleware signals the proxy to write back). When ctx ends the
// plant drains first (Config.DrainTimeout): it serves on, taking no new VMs,
// while the shops migrate its VMs away. Then the server is closed: the VMs
// left stop, the view is unmounted and dirty disks are written back.
func (s *Server) Serve(ctx context.Context) error {
	if s.drain > 0 {
		// The server must outlive ctx while it drains: the shops call it
		// to migrate the VMs, the destinations through its tunnel.
		asked := ctx
		served, stop := context.WithCancel(context.WithoutCancel(asked))
		defer stop()
		go func() {
			select {
			case <-asked.Done():
				s.Drain(s.drain)
				stop()
			case <-served.Done():
			}
		}()
		ctx = served
	}
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-usr1:
				s.log.Info("SIGUSR1: writing back every dirty disk")
				if _, err := s.Proxy.FlushAll(ctx); err != nil {
					s.log.Warn("write-back failed", zap.Error(err))
				}
			}
		}
	}()
	return s.Role.Serve(ctx)
}

// Drain marks the plant draining (it refuses new VMs and posts so in the
// registry, so it wins no auction) and waits, at most timeout, for the
// shops to move its VMs to other plants (plant.Drain).
func (s *Server) Drain(timeout time.Duration) {
	s.log.Info("draining: the plant takes no new VMs and waits for its VMs to migrate away", zap.Duration("timeout", timeout),
		zap.Int("vms", s.Line.Offer().Running))
	dctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if s.others != nil {
		go s.untilNowhere(dctx, cancel)
	}
	s.Line.Drain(dctx)
}

// nowherePoll is how often a draining plant looks for plants its VMs could
// go to; nowhereChecks is how many looks in a row must find none.
const (
	nowherePoll   = 500 * time.Millisecond
	nowhereChecks = 3
)

// untilNowhere ends the drain (cancel) when no other plant that is not
// draining is registered: when a whole grid stops at once (compose down),
// its plants would otherwise each wait out the timeout for nothing.
func (s *Server) untilNowhere(ctx context.Context, cancel context.CancelFunc) {
	t := time.NewTicker(nowherePoll)
	defer t.Stop()
	for none := 0; ; {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, err := s.others(ctx)
		switch {
		case err != nil:
			none = 0 // etcd away: the shops may still move VMs
		case n > 0:
			none = 0
		default:
			none++
		}
		if none == nowhereChecks {
			s.log.Warn("draining: no other plant takes VMs (all gone or draining); the drain ends")
			cancel()
			return
		}
	}
}

// Run starts a compute server and serves until ctx ends.
func Run(ctx context.Context, cfg Config) error {
	s, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	return s.Serve(ctx)
}

// joinMarket registers the plant in etcd under a session lease and answers
// the shop's auctions with the cost function's bids; stop leaves. others
// counts the other plants in the registry that are not draining.
func joinMarket(cfg Config, addr string, pl *plant.Plant, log *zap.Logger) (stop func(), others func(context.Context) (int, error), err error) {
	var undo services.Undo
	defer undo.OnError(&err)
	cli, err := cfg.Etcd.New(log)
	if err != nil {
		return nil, nil, err
	}
	undo.Push(func() { cli.Close() })
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	if err != nil {
		return nil, nil, fmt.Errorf("etcd session: %w", err)
	}
	undo.Push(func() { sess.Close() }) // revokes the lease: the plant leaves the registry now
	w := cfg.Weights
	if w == (market.Weights{}) {
		w = market.DefaultWeights()
	}
	info := func() market.PlantInfo {
		o := pl.Offer()
		return market.PlantInfo{Name: o.Name, Addr: addr, Arch: "x86_64", MemoryMiB: o.MemoryMiB, MemoryFreeMiB: o.FreeMiB,
			Running: o.Running, Domains: o.Domains, Images: o.Images, Draining: o.Draining}
	}
	info = withNetwork(info, pl)
	ctx, cancel := context.WithCancel(context.Background())
	undo.Push(cancel)
	// Bidding first: a shop that sees the plant registered gets its bids.
	done, err := market.StartBidder(ctx, cli, pl.Offer().Name, func(a market.Auction) market.Bid {
		return market.Quote(w, info(), a)
	}, log)
	if err != nil {
		return nil, nil, fmt.Errorf("etcd: %w", err)
	}
	undo.Push(func() { cancel(); <-done })
	registered, err := market.Register(ctx, sess, info, 100*time.Millisecond, log)
	if err != nil {
		return nil, nil, err
	}
	undo.Push(func() { cancel(); <-registered })
	if m := pl.Network(); m != nil {
		peers, err := followPeers(ctx, cli, m, log)
		if err != nil {
			return nil, nil, err
		}
		undo.Push(func() { cancel(); <-peers })
	}
	log.Info("plant joined the market", zap.Strings("etcd", cfg.Etcd.Endpoints), zap.String("addr", addr))
	return undo.Run, otherPlants(cli, pl.Offer().Name), nil
}

// otherPlants counts the plants in the registry, other than name, that
// are not draining.
func otherPlants(cli *clientv3.Client, name string) func(context.Context) (int, error) {
	return func(ctx context.Context) (int, error) {
		gctx, cancel := context.WithTimeout(ctx, market.OpTimeout)
		defer cancel()
		resp, err := cli.Get(gctx, market.PlantsPrefix, clientv3.WithPrefix())
		if err != nil {
			return 0, err
		}
		n := 0
		for _, kv := range resp.Kvs {
			var p market.PlantInfo
			if json.Unmarshal(kv.Value, &p) == nil && p.Name != name && !p.Draining {
				n++
			}
		}
		return n, nil
	}
}
