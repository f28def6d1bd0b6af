// Package cli is the vmgrid command line: server roles and client verbs.
// main only calls Main, so tests can drive the whole CLI in-process.
package cli

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/services"
)

// Main runs the CLI with args (without the program name) and returns the
// process exit code.
func Main(args []string) int {
	root := NewRoot()
	root.SetArgs(args)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "vmgrid:", describe(err))
		return 1
	}
	return 0
}

// describe prints a gRPC error as "Code: message".
func describe(err error) string {
	if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown {
		return fmt.Sprintf("%s: %s", s.Code(), s.Message())
	}
	return err.Error()
}

type globals struct {
	logLevel string
	logDev   bool
	tls      services.TLSFiles
}

func (g *globals) logger() (*zap.Logger, error) { return services.NewLogger(g.logLevel, g.logDev) }

// NewRoot builds the command tree.
func NewRoot() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:   "vmgrid",
		Short: "Provision virtual machines across many hosts, fast",
		Long: `vmgrid provisions virtual machines from golden images kept on image servers.
Compute servers read images block by block on demand through a local cache;
nothing is copied up front.

Server roles:   vmgrid imageserver | computeserver | cacheproxy | dataserver
Client verbs:   vmgrid image publish|ls|get|fetch|rm|create-disk
                vmgrid cache flush|stats|drop
                vmgrid data put|get|ls|stat|rm|grant|revoke|grants`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	pf.BoolVar(&g.logDev, "log-console", false, "human-readable console logs instead of JSON")
	pf.StringVar(&g.tls.CertFile, "tls-cert", "", "PEM certificate (server: its certificate; client: a client certificate for mutual TLS)")
	pf.StringVar(&g.tls.KeyFile, "tls-key", "", "PEM private key of --tls-cert")
	pf.StringVar(&g.tls.CAFile, "tls-ca", "", "PEM CA bundle (server: require client certificates signed by it; client: trust servers signed by it)")
	root.AddCommand(upCmd(g), shopCmd(g), vmCmd(g), taskCmd(g), imageserverCmd(g), computeserverCmd(g), cacheproxyCmd(g), imageCmd(g), cacheCmd(g), benchCmd(g), dataserverCmd(g), dataCmd(g))
	return root
}
