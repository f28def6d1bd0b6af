package cli

import (
	"context"

	"github.com/spf13/cobra"

	"github.com/vmgrid/vmgrid/imageserver"
)

func imageserverCmd(g *globals) *cobra.Command {
	cfg := imageserver.DefaultConfig()
	c := serverCmd(g, &cobra.Command{
		Use:   "imageserver",
		Short: "Serve golden images and persistent disks (the warehouse)",
		Long: `Serve golden images and persistent disks from a local directory.

On publish the server computes, for every file, a zero-block map (4 KiB), a
SHA-256 per block and a transfer policy (blocks on demand for disks, the
whole file through a zstd channel for memory state, kernels and configs).
Zero blocks are stored as holes and never sent.

Health (grpc.health.v1) and server reflection are served on the gRPC port,
Prometheus metrics on --metrics-listen at /metrics.`,
	}, &cfg.Server, func(ctx context.Context) error { return serve(ctx, imageserver.Start, cfg) })
	cfg.AddFlags(c.Flags())
	return c
}
