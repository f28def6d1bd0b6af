package imageserver

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
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

// DefaultConfig is the image server's defaults, the ones its flags show.
func DefaultConfig() Config {
	return Config{
		Server:  services.Options{Name: "imageserver", Listen: "127.0.0.1:7070", MetricsListen: "127.0.0.1:9070"},
		DataDir: "/var/lib/vmgrid/images",
	}
}

// AddFlags registers the image server's flags with c's values as defaults.
func (c *Config) AddFlags(fs *pflag.FlagSet) {
	c.Server.AddFlags(fs)
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "directory holding the images")
	fs.Uint32Var(&c.BlockSize, "block-size", c.BlockSize, "default block size of published files in bytes, a power of two from 4096 to 1048576 (0: 65536)")
	c.Server.AddShutdownFlag(fs)
}

// WriteBlocksMaxMsg is what the image server (and a cache proxy, which
// forwards write-back) reads of one message: a compute server's write-back
// sends up to 64 blocks of up to MaxBlockSize in one WriteBlocks message.
// Every other request fits services.DefaultMaxRecvMsgSize.
const WriteBlocksMaxMsg = 64*MaxBlockSize + 64<<10

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
	store, err := OpenStore(cfg.DataDir, log)
	if err != nil {
		return nil, err
	}
	if cfg.BlockSize != 0 {
		store.defaultBlockSize = cfg.BlockSize
	}
	if cfg.Server.MaxRecvMsgSize == 0 {
		cfg.Server.MaxRecvMsgSize = WriteBlocksMaxMsg
	}
	srv, err := services.NewServer(cfg.Server, func(gs *grpc.Server, reg prometheus.Registerer) error {
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
