package cli

import (
	"github.com/spf13/cobra"

	"github.com/vmgrid/vmgrid/imageserver"
)

func imageserverCmd(g *globals) *cobra.Command {
	var cfg imageserver.Config
	var blockSize uint32
	c := &cobra.Command{
		Use:   "imageserver",
		Short: "Serve golden images and persistent disks (the warehouse)",
		Long: `Serve golden images and persistent disks from a local directory.

On publish the server computes, for every file, a zero-block map (4 KiB), a
SHA-256 per block and a transfer policy (blocks on demand for disks, the
whole file through a zstd channel for memory state, kernels and configs).
Zero blocks are stored as holes and never sent.

Health (grpc.health.v1) and server reflection are served on the gRPC port,
Prometheus metrics on --metrics-listen at /metrics.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck
			cfg.Server.Name = "imageserver"
			cfg.Server.Logger = log
			cfg.Server.TLS = g.tls
			cfg.BlockSize = blockSize
			return imageserver.Run(cmd.Context(), cfg)
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.Server.Listen, "listen", "127.0.0.1:7070", "gRPC address to listen on")
	f.StringVar(&cfg.Server.MetricsListen, "metrics-listen", "127.0.0.1:9070", "Prometheus /metrics address (empty: off)")
	f.StringVar(&cfg.DataDir, "data-dir", "/var/lib/vmgrid/images", "directory holding the images")
	f.Uint32Var(&blockSize, "block-size", 0, "default block size of published files in bytes, a power of two from 4096 to 1048576 (0: 65536)")
	f.DurationVar(&cfg.Server.ShutdownTimeout, "shutdown-timeout", 0, "how long a graceful stop waits for running calls (0: 10s)")
	return c
}
