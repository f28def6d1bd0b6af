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
	"github.com/vmgrid/vmgrid/services/auth"
)

// CacheProxyConfig is what `vmgrid cacheproxy` needs.
type CacheProxyConfig struct {
	Server      services.Options
	Upstream    string
	UpstreamTLS services.TLSFiles
	Compress    bool
	DataDir     string
	// Proxy is the data plane: cache geometry, read-ahead, how long reads
	// wait for an absent upstream (its Upstream, Dir and Logger are set by
	// StartCacheProxy).
	Proxy gvfs.Config
	// TokensFile maps bearer tokens to callers; Tokens may be given
	// instead. One is required (auth.CacheProxyPolicy).
	TokensFile string
	Tokens     *auth.Tokens
	// ServiceTokenFile holds the proxy's token for its upstream (role
	// service there): it forwards with its own identity, not its callers'.
	ServiceTokenFile string
}

// CacheProxy is a running cache proxy: ImageService over a cache.
type CacheProxy struct {
	*services.Role
	Proxy *gvfs.Proxy
}

// StartCacheProxy opens the caches and starts listening; serve with Serve,
// stop with Close.
func StartCacheProxy(_ context.Context, cfg CacheProxyConfig) (_ *CacheProxy, err error) {
	var undo services.Undo
	defer undo.OnError(&err)
	log := services.LoggerOr(cfg.Server.Logger)
	tokens, err := services.ServerTokens(cfg.Tokens, cfg.TokensFile, "the cache proxy")
	if err != nil {
		return nil, err
	}
	up, err := dialUpstream(cfg.Upstream, cfg.UpstreamTLS, cfg.Compress, cfg.ServiceTokenFile, &undo)
	if err != nil {
		return nil, err
	}
	pc := cfg.Proxy
	pc.Upstream, pc.Dir, pc.FlushIdle, pc.Logger = up, cfg.DataDir, -1, log
	p, err := gvfs.New(pc)
	if err != nil {
		return nil, err
	}
	undo.Push(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		p.Close(ctx)
	})
	svc, err := cacheproxy.NewService(p)
	if err != nil {
		return nil, fmt.Errorf("cache proxy: %w", err)
	}
	opts := cfg.Server.Authenticated(&auth.Authenticator{Tokens: tokens, Policy: auth.CacheProxyPolicy()})
	srv, err := services.NewServer(opts, func(gs *grpc.Server, reg prometheus.Registerer) error {
		svc.Register(gs)
		return p.RegisterMetrics(reg)
	})
	if err != nil {
		return nil, fmt.Errorf("cache proxy: %w", err)
	}
	undo.Push(srv.Shutdown)
	log.Info("cache proxy ready", zap.String("upstream", cfg.Upstream))
	return &CacheProxy{Role: services.NewRole(srv, &undo), Proxy: p}, nil
}
