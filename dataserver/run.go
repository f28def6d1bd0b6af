package dataserver

import (
	"context"
	"errors"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

// Config is what `vmgrid dataserver` needs.
type Config struct {
	Server  services.Options
	DataDir string
	// TokensFile maps bearer tokens to owners (see package auth); Tokens
	// may be given instead. One of them is required: every file has an
	// owner, so there are no anonymous calls.
	TokensFile string
	Tokens     *auth.Tokens
	// TaskKeyFile, when set, is the key (auth.NewTaskKeyFile) the shop
	// signs task credentials with: plants present those to stage a task's
	// files (its owner's to read, its output prefix to write).
	TaskKeyFile string
	// MaxFileSize bounds one file (0: no limit but the disk).
	MaxFileSize uint64
}

// Start opens the store and starts serving; the returned server is already
// listening. Serve it with Server.Serve(ctx).
func Start(cfg Config) (*services.Server, error) {
	log := cfg.Server.Logger
	if log == nil {
		log = zap.NewNop()
	}
	tokens := cfg.Tokens
	if tokens == nil {
		if cfg.TokensFile == "" {
			return nil, errors.New("the data server needs a tokens file (--tokens): every file has an owner")
		}
		var err error
		if tokens, err = auth.Load(cfg.TokensFile); err != nil {
			return nil, err
		}
	}
	a := &auth.Authenticator{Tokens: tokens, Policy: auth.DataPolicy()}
	if cfg.TaskKeyFile != "" {
		var err error
		if a.TaskKey, err = auth.LoadTaskKey(cfg.TaskKeyFile); err != nil {
			return nil, err
		}
	}
	store, err := OpenStore(cfg.DataDir, log)
	if err != nil {
		return nil, err
	}
	store.MaxFileSize = cfg.MaxFileSize
	opts := cfg.Server
	opts.UnaryInterceptors = append(append([]grpc.UnaryServerInterceptor(nil), opts.UnaryInterceptors...), a.UnaryServerInterceptor())
	opts.StreamInterceptors = append(append([]grpc.StreamServerInterceptor(nil), opts.StreamInterceptors...), a.StreamServerInterceptor())
	return services.NewServer(opts, func(gs *grpc.Server, reg prometheus.Registerer) error {
		svc, err := NewService(store, log, reg)
		if err == nil {
			svc.Register(gs)
		}
		return err
	})
}

// Run serves until ctx ends.
func Run(ctx context.Context, cfg Config) error {
	srv, err := Start(cfg)
	if err != nil {
		return err
	}
	return srv.Serve(ctx)
}
