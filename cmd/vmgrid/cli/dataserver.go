package cli

import (
	"context"

	"github.com/spf13/cobra"

	"github.com/vmgrid/vmgrid/dataserver"
)

func dataserverCmd(g *globals) *cobra.Command {
	cfg := dataserver.DefaultConfig()
	c := serverCmd(g, &cobra.Command{
		Use:   "dataserver",
		Short: "Serve the data repository: task inputs and outputs, every file with an owner",
		Long: `Serve the data repository (Goiri et al. §3): clients upload the input files
of their tasks and download the outputs; compute plants stage inputs into a
VM's data disk and outputs back out.

Every call needs a bearer token from --tokens (one "TOKEN OWNER" pair per
line); an owner reads and writes only its own files, and reads another
owner's only under a prefix that owner granted (vmgrid data grant).

Uploads become visible only once complete and verified against the SHA-256
the client sends; files are stored under --data-dir sharded per owner.

Health (grpc.health.v1) and server reflection are served on the gRPC port,
Prometheus metrics on --metrics-listen at /metrics.`,
	}, &cfg.Server, func(ctx context.Context) error { return serve(ctx, dataserver.Start, cfg) })
	cfg.AddFlags(c.Flags())
	_ = c.MarkFlagRequired("tokens")
	return c
}
