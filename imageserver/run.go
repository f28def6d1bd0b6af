package imageserver

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/services"
)

// Config is what `vmgrid imageserver` needs.
type Config struct {
	Server  services.Options
	DataDir string
	// BlockSize is the default block size of published files (0: 64 KiB).
	BlockSize uint32
}

// Start opens the store and starts serving; the returned server is already
// listening. Serve it with Server.Serve(ctx).
func Start(cfg Config) (*services.Server, error) {
	log := cfg.Server.Logger
	if log == nil {
		log = zap.NewNop()
	}
	store, err := OpenStore(cfg.DataDir, log)
	if err != nil {
		return nil, err
	}
	if cfg.BlockSize != 0 {
		store.defaultBlockSize = cfg.BlockSize
	}
	return services.NewServer(cfg.Server, func(gs *grpc.Server, reg prometheus.Registerer) error {
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
