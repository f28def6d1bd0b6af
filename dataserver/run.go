package dataserver

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

// Config is what `vmgrid dataserver` needs.
type Config struct {
	Server services.Options
	Store  StoreConfig
	// TokensFile maps bearer tokens to owners (see package auth); Tokens
	// may be given instead. One of them is required: every file has an
	// owner, so there are no anonymous calls.
	TokensFile string
	Tokens     *auth.Tokens
	// TaskKeyFile, when set, is the key (auth.NewTaskKeyFile) the shop
	// signs task credentials with: plants present those to stage a task's
	// files (its owner's to read, its output prefix to write).
	TaskKeyFile string
}

// DefaultConfig is the data server's defaults, the ones its flags show.
func DefaultConfig() Config {
	return Config{
		Server: services.Options{Name: "dataserver", Listen: "127.0.0.1:7090", MetricsListen: "127.0.0.1:9090"},
		Store:  DefaultStoreConfig(),
	}
}

// AddFlags registers the data server's flags with c's values as defaults.
func (c *Config) AddFlags(fs *pflag.FlagSet) {
	c.Server.AddFlags(fs)
	c.Store.AddFlags(fs)
	services.AddTokensFlag(fs, &c.TokensFile)
	fs.StringVar(&c.TaskKeyFile, "task-key", c.TaskKeyFile, "key file checking the shop's task credentials (plants stage task files with them; empty: none accepted)")
	c.Server.AddShutdownFlag(fs)
}

// Server is a running data server.
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
	tokens, err := services.ServerTokens(cfg.Tokens, cfg.TokensFile, "the data server")
	if err != nil {
		return nil, err
	}
	sc := cfg.Store
	sc.Logger = log
	store, err := sc.Open()
	if err != nil {
		return nil, err
	}
	a := &auth.Authenticator{Tokens: tokens, Policy: auth.DataPolicy()}
	if cfg.TaskKeyFile != "" {
		if a.TaskKey, err = auth.LoadTaskKey(cfg.TaskKeyFile); err != nil {
			return nil, err
		}
	}
	srv, err := services.NewServer(cfg.Server.Authenticated(a), func(gs *grpc.Server, reg prometheus.Registerer) error {
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
