package shop

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/shop/market"
	"github.com/vmgrid/vmgrid/shop/web"
)

// RunConfig is what `vmgrid shop` needs (Config is the shop's logic's).
type RunConfig struct {
	Server services.Options
	Etcd   services.EtcdConfig
	Images string // image server (or cache proxy) address
	// TokensFile maps bearer tokens to owners; Tokens may be given instead.
	TokensFile      string
	Tokens          *auth.Tokens
	Weights         market.Weights
	AuctionDeadline time.Duration
	// Shortlist: see Config.Shortlist.
	Shortlist int
	// DataServer is the data server tasks stage files with ("" runs no
	// tasks). Plants stage with their own --dataserver; this one only says
	// the shop runs tasks.
	DataServer string
	// ServiceTokenFile holds the shop's token (role service) for the plants
	// and the image server.
	ServiceTokenFile string
	// TaskKeyFile is the key (shared with the data servers) the shop signs
	// task credentials with: a plant stages one owner's files for one task
	// or request with them. Required for tasks and stage_in.
	TaskKeyFile string
	// HTTPListen serves the HTTP/JSON API and the dashboard (shop/web)
	// there ("" serves none).
	HTTPListen string
}

// DefaultRunConfig is the shop's defaults, the ones its flags show.
func DefaultRunConfig() RunConfig {
	return RunConfig{
		Server:          services.Options{Name: "shop", Listen: "127.0.0.1:7060", MetricsListen: "127.0.0.1:9060"},
		Etcd:            services.DefaultEtcdConfig(),
		Images:          "127.0.0.1:7070",
		TokensFile:      "/etc/vmgrid/tokens",
		Weights:         market.DefaultWeights(),
		AuctionDeadline: 500 * time.Millisecond,
		Shortlist:       8,
	}
}

// AddFlags registers the shop's flags with c's values as defaults.
func (c *RunConfig) AddFlags(fs *pflag.FlagSet) {
	c.Server.AddFlags(fs)
	c.Etcd.AddFlags(fs, "etcd endpoints, comma separated")
	fs.StringVar(&c.Images, "images", c.Images, "image server (the warehouse) to match requests against")
	services.AddTokensFlag(fs, &c.TokensFile)
	services.AddServiceTokenFlag(fs, &c.ServiceTokenFile, "to the plants and the image server")
	fs.StringVar(&c.TaskKeyFile, "task-key", c.TaskKeyFile, "key file signing task credentials (the data servers' --task-key; required with --dataserver)")
	fs.DurationVar(&c.AuctionDeadline, "auction-deadline", c.AuctionDeadline, "how long to wait for bids")
	fs.Var(shortlistValue{&c.Shortlist}, "auction-shortlist", "invite the N plants (at most 100) whose registered offers cost least (0: every plant bids)")
	fs.StringVar(&c.DataServer, "dataserver", c.DataServer, "data server that tasks stage files with (empty: no tasks)")
	fs.StringVar(&c.HTTPListen, "http-listen", c.HTTPListen, "serve the HTTP/JSON API and the dashboard on this address (empty: none)")
	c.addWeightFlags(fs)
}

func (c *RunConfig) addWeightFlags(fs *pflag.FlagSet) {
	w := &c.Weights
	fs.Float64Var(&w.Compute, "cost-compute", w.Compute, "bid cost per VM running on a plant")
	fs.Float64Var(&w.Network, "cost-network", w.Network, "bid cost of a new host-only network for a client domain")
	fs.Float64Var(&w.CachePerGiB, "cost-cache-per-gib", w.CachePerGiB, "bid discount per GiB of the image a plant already holds")
	fs.Float64Var(&w.Memory, "cost-memory", w.Memory, "bid cost times the fraction of a plant's guest memory in use")
}

// shortlistValue is --auction-shortlist: 0 (or less) on the command line is
// an open auction, which Config spells -1 (its 0 is the default).
type shortlistValue struct{ n *int }

func (s shortlistValue) String() string { return strconv.Itoa(*s.n) }
func (s shortlistValue) Type() string   { return "int" }
func (s shortlistValue) Set(v string) error {
	n, err := strconv.Atoi(v)
	if err != nil {
		return err
	}
	if n <= 0 {
		n = -1
	}
	*s.n = n
	return nil
}

// Server is a running shop.
type Server struct {
	*services.Role
	Shop *Shop
	// HTTP is the HTTP/JSON API and dashboard (nil without HTTPListen).
	HTTP *web.Server
}

// Start connects to etcd and the image server and starts listening; serve
// with Serve, stop with Close.
func Start(ctx context.Context, cfg RunConfig) (_ *Server, err error) {
	var undo services.Undo
	defer undo.OnError(&err)
	log := services.LoggerOr(cfg.Server.Logger)
	tokens, err := services.ServerTokens(cfg.Tokens, cfg.TokensFile, "the shop")
	if err != nil {
		return nil, err
	}
	token, key, err := cfg.identity()
	if err != nil {
		return nil, err
	}
	cli, err := cfg.Etcd.New(log)
	if err != nil {
		return nil, err
	}
	undo.Push(func() { cli.Close() })
	cc, err := services.Dial(cfg.Images, cfg.Server.TLS, services.WithToken(token, cfg.Server.TLS))
	if err != nil {
		return nil, err
	}
	undo.Push(func() { cc.Close() })
	a := &auth.Authenticator{Tokens: tokens, Policy: auth.ShopPolicy()}
	opts := cfg.Server.Authenticated(a)
	var shop *Shop
	srv, err := services.NewServer(opts, func(gs *grpc.Server, reg prometheus.Registerer) error {
		var err error
		shop, err = New(Config{Etcd: cli, Images: imageclient.NewClient(cc), Weights: cfg.Weights,
			AuctionDeadline: cfg.AuctionDeadline, Shortlist: cfg.Shortlist, PlantTLS: cfg.Server.TLS, DataServer: cfg.DataServer,
			ServiceToken: token, TaskKey: key, Logger: log}, reg)
		if err != nil {
			return err
		}
		undo.Push(shop.Close)
		shopv1.RegisterShopServiceServer(gs, shop)
		return nil
	})
	if err != nil {
		return nil, err
	}
	undo.Push(srv.Shutdown)
	if cfg.DataServer != "" {
		if err := shop.startTasks(); err != nil {
			return nil, err
		}
	}
	hs, err := startHTTP(ctx, cfg, srv.Addr(), a, shop)
	if err != nil {
		return nil, err
	}
	if hs != nil {
		undo.Push(hs.Close)
	}
	return &Server{Role: services.NewRole(srv, &undo), Shop: shop, HTTP: hs}, nil
}

// startHTTP serves the HTTP side when configured: its gateway dials the
// shop's own gRPC address.
func startHTTP(ctx context.Context, cfg RunConfig, addr string, a *auth.Authenticator, shop *Shop) (*web.Server, error) {
	if cfg.HTTPListen == "" {
		return nil, nil
	}
	return web.Start(ctx, web.Config{Listen: cfg.HTTPListen, Shop: addr, TLS: cfg.Server.TLS, Auth: a, Source: shop,
		Logger: services.LoggerOr(cfg.Server.Logger).Named("http")})
}

// identity reads the shop's service token and task key.
func (c RunConfig) identity() (token string, key auth.TaskKey, err error) {
	if token, err = services.ServiceToken(c.ServiceTokenFile); err != nil {
		return "", nil, err
	}
	if c.TaskKeyFile != "" {
		if key, err = auth.LoadTaskKey(c.TaskKeyFile); err != nil {
			return "", nil, err
		}
	} else if c.DataServer != "" {
		return "", nil, errors.New("a shop that runs tasks (--dataserver) needs --task-key: plants stage with the credentials it signs")
	}
	return token, key, nil
}
