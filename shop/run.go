package shop

import (
	"context"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/shop/market"
)

// RunConfig is what `vmgrid shop` needs.
type RunConfig struct {
	Server          services.Options
	Etcd            []string
	Images          string // image server (or cache proxy) address
	Tokens          *auth.Tokens
	Weights         market.Weights
	AuctionDeadline time.Duration
	// Shortlist: see Config.Shortlist.
	Shortlist int
	// DataServer is the data server tasks stage files with ("" runs no
	// tasks).
	DataServer string
}

// Server is a running shop.
type Server struct {
	*services.Server
	Shop   *Shop
	etcd   *clientv3.Client
	images *grpc.ClientConn
}

// Start connects to etcd and the image server and starts serving.
func Start(cfg RunConfig) (*Server, error) {
	log := cfg.Server.Logger
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.Tokens == nil {
		return nil, fmt.Errorf("the shop needs a tokens file (owners authenticate with bearer tokens)")
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: cfg.Etcd, DialTimeout: 5 * time.Second, Logger: services.Quieter(log.Named("etcd-client"), zap.WarnLevel)})
	if err != nil {
		return nil, fmt.Errorf("etcd %v: %w", cfg.Etcd, err)
	}
	cc, err := services.Dial(cfg.Images, cfg.Server.TLS)
	if err != nil {
		cli.Close()
		return nil, err
	}
	a := &auth.Authenticator{Tokens: cfg.Tokens, Policy: auth.ShopPolicy()}
	cfg.Server.UnaryInterceptors = append(cfg.Server.UnaryInterceptors, a.UnaryServerInterceptor())
	cfg.Server.StreamInterceptors = append(cfg.Server.StreamInterceptors, a.StreamServerInterceptor())
	var shop *Shop
	srv, err := services.NewServer(cfg.Server, func(gs *grpc.Server, reg prometheus.Registerer) error {
		var err error
		shop, err = New(Config{Etcd: cli, Images: imageclient.NewClient(cc), Weights: cfg.Weights,
			AuctionDeadline: cfg.AuctionDeadline, Shortlist: cfg.Shortlist, PlantTLS: cfg.Server.TLS, DataServer: cfg.DataServer, Log: log}, reg)
		if err == nil {
			shopv1.RegisterShopServiceServer(gs, shop)
		}
		return err
	})
	if err != nil {
		cc.Close()
		cli.Close()
		return nil, err
	}
	if cfg.DataServer != "" {
		if err := shop.startTasks(); err != nil {
			srv.Shutdown()
			cc.Close()
			cli.Close()
			return nil, err
		}
	}
	return &Server{Server: srv, Shop: shop, etcd: cli, images: cc}, nil
}

// Serve serves until ctx ends.
func (s *Server) Serve(ctx context.Context) error {
	err := s.Server.Serve(ctx)
	s.Shop.Close()
	s.images.Close()
	s.etcd.Close()
	return err
}
