// Package cli is the vmgrid command line: server roles and client verbs,
// one file per command group (as etcdctl lays out its commands): up.go,
// vm.go, task.go, data.go, image.go (image_build.go), cache.go, bench.go,
// certs.go, and one file per server role (shop.go, imageserver.go,
// dataserver.go, computeserver.go, cacheproxy.go, etcd.go). dial.go holds what they share: the
// address of the service a verb talks to, and the prologue of a server
// role. main only calls Main, so tests can drive the whole CLI in-process.
package cli

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
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
		var exit *exitCodeError // vm exec, vm ssh: the command's own exit code
		if errors.As(err, &exit) {
			return exit.code
		}
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
	// config is --config (client contexts), contextName --context.
	config, contextName string
	cx                  *clientContext // loaded once, by clientContext
}

func (g *globals) logger() (*zap.Logger, error) { return services.NewLogger(g.logLevel, g.logDev) }

// withLogger runs fn with the logger of the global flags, synced after.
func (g *globals) withLogger(fn func(log *zap.Logger) error) error {
	log, err := g.logger()
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck
	return fn(log)
}

// clientTLS is the client's TLS files: the flags (their defaults are the
// environment's), else the context's.
func (g *globals) clientTLS() (services.TLSFiles, error) {
	cx, err := g.clientContext()
	if err != nil {
		return services.TLSFiles{}, err
	}
	return services.TLSFiles{CAFile: cmp.Or(g.tls.CAFile, cx.TLSCA), CertFile: cmp.Or(g.tls.CertFile, cx.TLSCert), KeyFile: cmp.Or(g.tls.KeyFile, cx.TLSKey)}, nil
}

// NewRoot builds the command tree.
func NewRoot() *cobra.Command {
	g := &globals{}
	root := group(&cobra.Command{
		Use:   "vmgrid",
		Short: "Provision virtual machines across many hosts, fast",
		Long: `vmgrid provisions virtual machines from golden images kept on image servers.
Compute servers read images block by block on demand through a local cache;
nothing is copied up front.

Client verbs take their addresses, token and TLS files from, first to last:
flags, environment variables, the current context of the client config
file (vmgrid context; vmgrid up writes one), built-in defaults. Every get
and ls prints -o table (default), wide, json or yaml.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}, upCmd(g), etcdCmd(g), certsCmd(g), shopCmd(g), vmCmd(g), taskCmd(g), imageserverCmd(g), computeserverCmd(g), cacheproxyCmd(g),
		imageCmd(g), cacheCmd(g), benchCmd(g), dataserverCmd(g), dataCmd(g), contextCmd(g), plantCmd(g),
		healthCmd(g))
	root.Long += "\n\n" + verbList(root)
	g.addFlags(root.PersistentFlags())
	return root
}

// addFlags registers the global flags on pf.
func (g *globals) addFlags(pf *pflag.FlagSet) {
	pf.StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	pf.BoolVar(&g.logDev, "log-console", false, "human-readable console logs instead of JSON")
	pf.StringVar(&g.config, "config", "", "client config file with the contexts (env VMGRID_CONFIG, default $XDG_CONFIG_HOME/vmgrid/config.yaml)")
	pf.StringVar(&g.contextName, "context", "", "use this context instead of the current one (vmgrid up: the name of the context it writes, default the base name of --dir)")
	pf.DurationVar(&g.timeout, "timeout", 30*time.Second, "deadline of each call to a service (streams: of reaching the service; 0: none)")
	// The TLS files default from the environment: `vmgrid up` writes the
	// client's into DIR/env, so a shell that sourced it speaks mutual TLS.
	pf.StringVar(&g.tls.CertFile, "tls-cert", os.Getenv("VMGRID_TLS_CERT"), "PEM certificate (server: its certificate; client: a client certificate for mutual TLS) (env VMGRID_TLS_CERT)")
	pf.StringVar(&g.tls.KeyFile, "tls-key", os.Getenv("VMGRID_TLS_KEY"), "PEM private key of --tls-cert (env VMGRID_TLS_KEY)")
	pf.StringVar(&g.tls.CAFile, "tls-ca", os.Getenv("VMGRID_TLS_CA"), "PEM CA bundle (server: require client certificates signed by it; client: trust servers signed by it) (env VMGRID_TLS_CA)")
}

// verbList lists every command of root, a group with its verbs: the root
// help names them all, and stays true as verbs come and go.
func verbList(root *cobra.Command) string {
	var b strings.Builder
	b.WriteString("Every command:")
	for _, c := range root.Commands() {
		if !c.IsAvailableCommand() || c.Name() == "help" || c.Name() == "completion" {
			continue
		}
		var verbs []string
		for _, v := range c.Commands() {
			if v.IsAvailableCommand() {
				verbs = append(verbs, v.Name())
			}
		}
		b.WriteString("\n  vmgrid " + c.Name())
		if len(verbs) > 0 {
			b.WriteString(" " + strings.Join(verbs, "|"))
		}
	}
	return b.String()
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
