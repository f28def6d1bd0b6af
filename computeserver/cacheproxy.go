package computeserver

import (
	"context"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/gvfs/cacheproxy"
	"github.com/vmgrid/vmgrid/services"
)

// CacheProxyConfig is what `vmgrid cacheproxy` needs.
type CacheProxyConfig struct {
	Server      services.Options
	Upstream    string
	UpstreamTLS services.TLSFiles
	Compress    bool
	DataDir     string
	Cache       gvfs.CacheConfig
	ReadAhead   int
	// UpstreamRetry is how long reads wait for an upstream that is away
	// (0: gvfs.DefaultConfig's).
	UpstreamRetry time.Duration
}

// CacheProxy is a running cache proxy: ImageService over a cache.
type CacheProxy struct {
	Server *services.Server
	Proxy  *gvfs.Proxy
}

// StartCacheProxy opens the caches and starts serving the read API.
func StartCacheProxy(cfg CacheProxyConfig) (*CacheProxy, error) {
	log := services.LoggerOr(cfg.Server.Logger)
	up, err := gvfs.DialUpstream(cfg.Upstream, cfg.UpstreamTLS, cfg.Compress)
	if err != nil {
		return nil, err
	}
	p, err := gvfs.New(gvfs.Config{
		Upstream: up, Dir: cfg.DataDir, Cache: cfg.Cache, ReadAhead: cfg.ReadAhead,
		UpstreamRetry: cfg.UpstreamRetry, FlushIdle: -1, Logger: log,
	})
	if err != nil {
		up.Close()
		return nil, err
	}
	svc, err := cacheproxy.NewService(p)
	if err == nil {
		var srv *services.Server
		srv, err = services.NewServer(cfg.Server, func(gs *grpc.Server, reg prometheus.Registerer) error {
			svc.Register(gs)
			return p.RegisterMetrics(reg)
		})
		if err == nil {
			log.Info("cache proxy ready", zap.String("upstream", cfg.Upstream))
			return &CacheProxy{Server: srv, Proxy: p}, nil
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p.Close(ctx)
	up.Close()
	return nil, fmt.Errorf("cache proxy: %w", err)
}

// Close stops serving and closes the caches.
func (c *CacheProxy) Close() {
	c.Server.Shutdown()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c.Proxy.Close(ctx)
	c.Proxy.Upstream().Close()
}

// RunCacheProxy serves until ctx ends.
func RunCacheProxy(ctx context.Context, cfg CacheProxyConfig) error {
	c, err := StartCacheProxy(cfg)
	if err != nil {
		return err
	}
	err = c.Server.Serve(ctx)
	c.Close()
	return err
}
