// Package cli is the vmgrid command line: server roles and client verbs,
// one file per command group (as etcdctl lays out its commands): up.go,
// vm.go, task.go, data.go, image.go (image_build.go), cache.go, bench.go,
// certs.go, and one file per server role (shop.go, imageserver.go,
// dataserver.go, computeserver.go, cacheproxy.go, etcd.go). dial.go holds what they share: the
// address of the service a verb talks to, and the prologue of a server
// role. main only calls Main, so tests can drive the whole CLI in-process.
package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/services"
)

// Main runs the CLI with args (without the program name) and returns the
// process exit code.
func Main(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return run(ctx, args, os.Stdout, os.Stderr)
}

// run is Main with its context and output given: a failure is one line
// on stderr and exit code 1.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := NewRoot()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(stderr, "vmgrid:", describe(err))
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
	// timeout bounds every unary call, and how long a stream waits to
	// reach its service.
	timeout time.Duration
}

func (g *globals) logger() (*zap.Logger, error) { return services.NewLogger(g.logLevel, g.logDev) }

// NewRoot builds the command tree.
func NewRoot() *cobra.Command {
	g := &globals{}
	root := group(&cobra.Command{
		Use:   "vmgrid",
		Short: "Provision virtual machines across many hosts, fast",
		Long: `vmgrid provisions virtual machines from golden images kept on image servers.
Compute servers read images block by block on demand through a local cache;
nothing is copied up front.

Server roles:   vmgrid imageserver | computeserver | cacheproxy | dataserver | etcd
Certificates:   vmgrid certs (a CA and the services' mutual-TLS certificates)
Client verbs:   vmgrid image publish|ls|get|fetch|rm|create-disk
                vmgrid cache flush|stats|drop
                vmgrid data put|get|ls|stat|rm|grant|revoke|grants`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}, upCmd(g), etcdCmd(g), certsCmd(g), shopCmd(g), vmCmd(g), taskCmd(g), imageserverCmd(g), computeserverCmd(g), cacheproxyCmd(g),
		imageCmd(g), cacheCmd(g), benchCmd(g), dataserverCmd(g), dataCmd(g))
	pf := root.PersistentFlags()
	pf.StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	pf.BoolVar(&g.logDev, "log-console", false, "human-readable console logs instead of JSON")
	pf.DurationVar(&g.timeout, "timeout", 30*time.Second, "deadline of each call to a service (streams: of reaching the service; 0: none)")
	// The TLS files default from the environment: `vmgrid up` writes the
	// client's into DIR/env, so a shell that sourced it speaks mutual TLS.
	pf.StringVar(&g.tls.CertFile, "tls-cert", os.Getenv("VMGRID_TLS_CERT"), "PEM certificate (server: its certificate; client: a client certificate for mutual TLS) (env VMGRID_TLS_CERT)")
	pf.StringVar(&g.tls.KeyFile, "tls-key", os.Getenv("VMGRID_TLS_KEY"), "PEM private key of --tls-cert (env VMGRID_TLS_KEY)")
	pf.StringVar(&g.tls.CAFile, "tls-ca", os.Getenv("VMGRID_TLS_CA"), "PEM CA bundle (server: require client certificates signed by it; client: trust servers signed by it) (env VMGRID_TLS_CA)")
	return root
}

// group makes c a command group: run without a subcommand, or with one it
// does not know, it fails with a one-line error (cobra would print the
// help and exit 0).
func group(c *cobra.Command, subs ...*cobra.Command) *cobra.Command {
	c.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) == 0 {
			return fmt.Errorf("%s: missing subcommand (see %s --help)", cmd.CommandPath(), cmd.CommandPath())
		}
		return fmt.Errorf("%s: unknown subcommand %q (see %s --help)", cmd.CommandPath(), args[0], cmd.CommandPath())
	}
	c.AddCommand(subs...)
	// A group runs only to fail, so its usage shows no "vmgrid vm [flags]"
	// line of its own (subcommands inherit the template).
	c.SetUsageTemplate(strings.Replace(c.UsageTemplate(), "Usage:{{if .Runnable}}",
		"Usage:{{if and .Runnable (not .HasAvailableSubCommands)}}", 1))
	return c
}
