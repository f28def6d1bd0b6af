package imageserver

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

// Config is what `vmgrid imageserver` needs.
type Config struct {
	Server services.Options
	Store  StoreConfig
	// TokensFile maps bearer tokens to callers (see package auth); Tokens
	// may be given instead. One of them is required: publishing, deleting
	// and writing disks are for operators, publishers and services only.
	TokensFile string
	Tokens     *auth.Tokens
}

// DefaultConfig is the image server's defaults, the ones its flags show.
func DefaultConfig() Config {
	return Config{
		Server: services.Options{Name: "imageserver", Listen: "127.0.0.1:7070", MetricsListen: "127.0.0.1:9070"},
		Store:  DefaultStoreConfig(),
	}
}

// AddFlags registers the image server's flags with c's values as defaults.
func (c *Config) AddFlags(fs *pflag.FlagSet) {
	c.Server.AddFlags(fs)
	c.Store.AddFlags(fs)
	services.AddTokensFlag(fs, &c.TokensFile)
	c.Server.AddShutdownFlag(fs)
}

// Server is a running image server.
type Server struct {
	*services.Role
	Store *Store
}

// Start opens the store and starts listening; serve with Serve, stop with
// Close.
func Start(_ context.Context, cfg Config) (_ *Server, err error) {
	var undo services.Undo
	defer undo.OnError(&err)
	log := services.LoggerOr(cfg.Server.Logger)
	tokens, err := services.ServerTokens(cfg.Tokens, cfg.TokensFile, "the image server")
	if err != nil {
		return nil, err
	}
	sc := cfg.Store
	sc.Logger = log
	store, err := sc.Open()
	if err != nil {
		return nil, err
	}
	opts := cfg.Server.Authenticated(&auth.Authenticator{Tokens: tokens, Policy: auth.ImagePolicy()})
	srv, err := services.NewServer(opts, func(gs *grpc.Server, reg prometheus.Registerer) error {
		svc, err := NewService(store, log, reg)
		if err == nil {
			svc.Register(gs)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	undo.Push(srv.Shutdown)
	return &Server{Role: services.NewRole(srv, &undo), Store: store}, nil
}

// Run serves until ctx ends.
func Run(ctx context.Context, cfg Config) error {
	srv, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	return srv.Serve(ctx)
}
