package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/services"
)

// healthCmd asks a server's grpc.health.v1 service whether it serves: the
// healthcheck of the compose grid's containers and of systemd units. It
// reads no client context (a healthcheck runs where there is none): the TLS
// files come from the flags or VMGRID_TLS_*.
func healthCmd(g *globals) *cobra.Command {
	var svc, serverName string
	c := &cobra.Command{
		Use:   "health ADDR",
		Short: "Check that the server at ADDR serves (grpc.health.v1); exit 1 when it does not",
		Long: `Ask the grpc.health.v1 service of the server at ADDR (HOST:PORT) for the
status of --service (empty: the server as a whole). It prints SERVING and
exits 0, or prints the status or the error and exits 1: the healthcheck of
containers and units. Every vmgrid server and etcd answer it without a
token; with TLS give --tls-ca (and, where client certificates are
required, --tls-cert and --tls-key). It uses no client context.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := checkHealth(cmd.Context(), args[0], svc, serverName, g)
			if err != nil {
				return err
			}
			if st != healthpb.HealthCheckResponse_SERVING {
				return fmt.Errorf("%s: %s", args[0], st)
			}
			fmt.Fprintln(cmd.OutOrStdout(), st)
			return nil
		},
	}
	c.Flags().StringVar(&svc, "service", "", "service to ask about (e.g. vmgrid.shop.v1.ShopService; empty: the whole server)")
	c.Flags().StringVar(&serverName, "server-name", "", "name to verify the server's certificate against (default: the host of ADDR)")
	return c
}

// checkHealth makes one Check call, bounded by --timeout (5 s when none).
func checkHealth(ctx context.Context, addr, svc, serverName string, g *globals) (healthpb.HealthCheckResponse_ServingStatus, error) {
	tls := g.tls
	tls.ServerName = serverName
	cc, err := services.Dial(addr, tls)
	if err != nil {
		return 0, err
	}
	defer cc.Close()
	d := g.timeout
	if d <= 0 {
		d = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
	if err != nil {
		if s, ok := status.FromError(err); ok && s.Code() == codes.DeadlineExceeded {
			return 0, fmt.Errorf("%s did not answer within %s", addr, d)
		}
		return 0, fmt.Errorf("%s: %w", addr, err)
	}
	return resp.GetStatus(), nil
}
