package cli

import (
	"cmp"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/deploy/grid"
)

func upCmd(g *globals) *cobra.Command {
	var cfg grid.Config
	c := &cobra.Command{
		Use:   "up",
		Short: "Start a whole grid on this machine: etcd, image server, plants, shop",
		Long: `Start a whole grid on this machine in one process: an embedded etcd, an image
server, --plants compute servers (each with its FUSE view under --dir) and
the shop. The first start builds the tiny golden image (Debian's cloud
kernel, busybox, the guest agent: vmgrid-agent beside this binary, or this
binary) and publishes it. It writes the grid into the client config file
as a context (named after --dir, or --context NAME) and makes it current,
writes DIR/env with the same as shell exports (VMGRID_SHOP,
VMGRID_IMAGESERVER, VMGRID_DATASERVER, VMGRID_COMPUTESERVER: the plants, the
token of the owner "demo" as VMGRID_TOKEN and the operator's as
VMGRID_OPERATOR_TOKEN), and runs until interrupted. Every service takes tokens (DIR/tokens); the services call each
other with the service token in DIR/service.token.

Every gRPC server and etcd speak mutual TLS only, with a CA and one
certificate per service made in DIR/pki (kept across restarts); etcd lets in
only the shop's and the plants' certificates. DIR/env names the client's
certificate (VMGRID_TLS_CA, VMGRID_TLS_CERT, VMGRID_TLS_KEY, the defaults of
--tls-ca, --tls-cert and --tls-key). --insecure serves plaintext instead.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withLogger(func(log *zap.Logger) error { return up(cmd, g, cfg, log) })
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.Dir, "dir", "/var/lib/vmgrid/up", "directory for everything the grid keeps (short: unix sockets live below it)")
	f.IntVar(&cfg.Plants, "plants", 2, "number of compute servers")
	f.IntVar(&cfg.ShopPort, "shop-port", 7060, "shop port (0: any)")
	f.IntVar(&cfg.ImagesPort, "images-port", 7070, "image server port (0: any)")
	f.IntVar(&cfg.HTTPPort, "http-port", 8060, "port of the shop's dashboard and HTTP/JSON API (0: any)")
	f.StringVar(&cfg.Golden, "golden", "tiny", "golden image to build and publish if missing (empty: none)")
	f.BoolVar(&cfg.Insecure, "insecure", false, "plaintext everywhere and etcd without authentication (tests and benchmarks only)")
	f.Uint64Var(&cfg.GuestMemoryMiB, "guest-memory-mib", 0, "memory the guests of all plants may use together, divided among the plants (0: 80% of RAM)")
	return c
}

// up starts the grid, says how to reach it (DIR/env, a context) and runs
// until the command's context ends (Main's: on SIGINT and SIGTERM).
func up(cmd *cobra.Command, g *globals, cfg grid.Config, log *zap.Logger) (err error) {
	if cfg.Golden != "" {
		if cfg.AgentPath, err = guestAgent(); err != nil {
			return err
		}
	}
	cfg.Logger = log
	if cfg.Dir, err = filepath.Abs(cfg.Dir); err != nil {
		return err
	}
	gr, err := grid.Up(cmd.Context(), cfg)
	if err != nil {
		return err
	}
	defer gr.Close()
	envFile := filepath.Join(cfg.Dir, "env")
	if err := writeEnv(envFile, gr); err != nil {
		return err
	}
	name := cmp.Or(g.contextName, filepath.Base(cfg.Dir))
	if err := saveContext(g.configPath(), name, gr); err != nil {
		return err
	}
	printUp(cmd.OutOrStdout(), gr, envFile, name, g.configPath())
	<-cmd.Context().Done()
	fmt.Fprintln(cmd.OutOrStdout(), "stopping")
	return nil
}

// saveContext writes the grid into the client config file at path as the
// context name and makes it current: client verbs then reach the grid
// without flags or DIR/env.
func saveContext(path, name string, gr *grid.Grid) error {
	c, err := loadConfig(path)
	if err != nil {
		return err
	}
	cx := &clientContext{Shop: gr.Shop.Addr(), ImageServer: gr.Images.Addr(), DataServer: gr.Data.Addr(),
		Token: gr.Token, OperatorToken: gr.OperatorToken,
		TLSCA: gr.ClientTLS.CAFile, TLSCert: gr.ClientTLS.CertFile, TLSKey: gr.ClientTLS.KeyFile}
	for _, p := range gr.Plants {
		cx.ComputeServers = append(cx.ComputeServers, p.Addr())
	}
	c.Contexts[name], c.Current = cx, name
	return c.save(path)
}

// writeEnv writes the grid's addresses and token as shell exports.
func writeEnv(file string, gr *grid.Grid) error {
	var plants []string
	for _, p := range gr.Plants {
		plants = append(plants, p.Addr())
	}
	// The image and cache verbs take the operator's token when it is set;
	// the cache verbs act on every compute server listed.
	env := fmt.Sprintf("export VMGRID_SHOP=%s\nexport VMGRID_TOKEN=%s\nexport VMGRID_OPERATOR_TOKEN=%s\nexport VMGRID_IMAGESERVER=%s\nexport VMGRID_DATASERVER=%s\nexport VMGRID_COMPUTESERVER=%s\n",
		gr.Shop.Addr(), gr.Token, gr.OperatorToken, gr.Images.Addr(), gr.Data.Addr(), strings.Join(plants, ","))
	if t := gr.ClientTLS; t.Enabled() {
		env += fmt.Sprintf("export VMGRID_TLS_CA=%s\nexport VMGRID_TLS_CERT=%s\nexport VMGRID_TLS_KEY=%s\n", t.CAFile, t.CertFile, t.KeyFile)
	}
	return os.WriteFile(file, []byte(env), 0o600)
}

func printUp(out io.Writer, gr *grid.Grid, envFile, context, config string) {
	fmt.Fprintf(out, "vmgrid is up: shop %s, image server %s, data server %s, etcd %s, %d plants\n", gr.Shop.Addr(), gr.Images.Addr(), gr.Data.Addr(), gr.Etcd.Endpoint, len(gr.Plants))
	for i, p := range gr.Plants {
		fmt.Fprintf(out, "  plant%d %s  view %s\n", i, p.Addr(), p.Mountpoint)
	}
	if gr.ClientTLS.Enabled() {
		fmt.Fprintf(out, "mutual TLS everywhere: the CA and certificates are in %s\n", gr.PKI)
	}
	fmt.Fprintf(out, "dashboard and HTTP/JSON API %s (sign in with $VMGRID_TOKEN)\n", gr.URL())
	fmt.Fprintf(out, "owner \"demo\" and the operator, tokens file %s\n", gr.TokensFile)
	fmt.Fprintf(out, "context %q is current (%s): vmgrid vm create --hostname demo1\n", context, config)
	fmt.Fprintf(out, "or, in a shell:  . %s\n", envFile)
}

// guestAgent returns the static guest agent to put into golden images:
// vmgrid-agent beside this executable (make build puts it there; being
// small, it leaves less of itself in a golden image's memory state), or
// this executable, which is the agent too when statically linked.
func guestAgent() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	if a := filepath.Join(filepath.Dir(exe), "vmgrid-agent"); isStatic(a) == nil {
		return a, nil
	}
	if err := isStatic(exe); err != nil {
		return "", err
	}
	return exe, nil
}

// isStatic checks that exe is a statically linked executable (it can run
// inside a guest).
func isStatic(exe string) error {
	f, err := elf.Open(exe)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked; build it with CGO_ENABLED=0 (make build does) so it can be the guest agent", exe)
		}
	}
	return nil
}
