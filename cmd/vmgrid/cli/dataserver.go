package cli

import (
	"github.com/spf13/cobra"

	"github.com/vmgrid/vmgrid/dataserver"
)

func dataserverCmd(g *globals) *cobra.Command {
	var cfg dataserver.Config
	var maxFile int64
	c := &cobra.Command{
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
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck
			cfg.Server.Name = "dataserver"
			cfg.Server.Logger = log
			cfg.Server.TLS = g.tls
			cfg.MaxFileSize = uint64(maxFile)
			return dataserver.Run(cmd.Context(), cfg)
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.Server.Listen, "listen", "127.0.0.1:7090", "gRPC address to listen on")
	f.StringVar(&cfg.Server.MetricsListen, "metrics-listen", "127.0.0.1:9090", "Prometheus /metrics address (empty: off)")
	f.StringVar(&cfg.DataDir, "data-dir", "/var/lib/vmgrid/data", "directory holding the files")
	f.StringVar(&cfg.TokensFile, "tokens", "", `tokens file: one "TOKEN OWNER" pair per line (required)`)
	f.StringVar(&cfg.TaskKeyFile, "task-key", "", "key file checking the shop's task credentials (plants stage task files with them; empty: none accepted)")
	f.Var(sizeValue{&maxFile}, "max-file-size", "largest file accepted, e.g. 100GiB (0: no limit but the disk)")
	f.DurationVar(&cfg.Server.ShutdownTimeout, "shutdown-timeout", 0, "how long a graceful stop waits for running calls (0: 10s)")
	_ = c.MarkFlagRequired("tokens")
	return c
}
