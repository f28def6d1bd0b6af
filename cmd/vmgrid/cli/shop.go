package cli

import (
	"crypto/rand"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/vmgrid/vmgrid/deploy/grid"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/shop"
)

func shopCmd(g *globals) *cobra.Command {
	var cfg shop.RunConfig
	var etcd, images, tokens string
	c := &cobra.Command{
		Use:   "shop",
		Short: "Run a shop: CreateVM by auction among the plants, classads in etcd",
		Long: `Run a shop (VMPlants' VMShop). Clients ask it for VMs with a bearer token
(--tokens file: one "TOKEN OWNER" per line). It matches the request's
configuration DAG against the golden images, holds an auction in etcd among
the plants registered there, asks the winner to create the VM and keeps the
classad in etcd. It keeps no state of its own: run as many as you like.

The auction's cost function is the shop's (--cost-*): plants price with the
weights each auction carries. With many plants the shop invites only the
--auction-shortlist plants whose registered offers cost least; they bid with
their live state, and if none of them can host the VM every plant is asked.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck
			if cfg.Tokens, err = auth.Load(tokens); err != nil {
				return err
			}
			cfg.Server.Name, cfg.Server.Logger, cfg.Server.TLS = "shop", log, g.tls
			cfg.Etcd, cfg.Images = strings.Split(etcd, ","), images
			if cfg.Shortlist <= 0 {
				cfg.Shortlist = -1 // an open auction
			}
			s, err := shop.Start(cfg)
			if err != nil {
				return err
			}
			return s.Serve(cmd.Context())
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.Server.Listen, "listen", "127.0.0.1:7060", "gRPC address to listen on")
	f.StringVar(&cfg.Server.MetricsListen, "metrics-listen", "127.0.0.1:9060", "Prometheus /metrics address (empty: off)")
	f.StringVar(&etcd, "etcd", "http://127.0.0.1:2379", "etcd endpoints, comma separated")
	f.StringVar(&images, "images", "127.0.0.1:7070", "image server (the warehouse) to match requests against")
	f.StringVar(&tokens, "tokens", "/etc/vmgrid/tokens", "tokens file: TOKEN OWNER per line")
	f.DurationVar(&cfg.AuctionDeadline, "auction-deadline", 500*time.Millisecond, "how long to wait for bids")
	f.IntVar(&cfg.Shortlist, "auction-shortlist", 8, "invite the N plants (at most 100) whose registered offers cost least (0: every plant bids)")
	f.StringVar(&cfg.DataServer, "dataserver", "", "data server that tasks stage files with (empty: no tasks)")
	f.Float64Var(&cfg.Weights.Compute, "cost-compute", 4, "bid cost per VM running on a plant")
	f.Float64Var(&cfg.Weights.Network, "cost-network", 50, "bid cost of a new host-only network for a client domain")
	f.Float64Var(&cfg.Weights.CachePerGiB, "cost-cache-per-gib", 10, "bid discount per GiB of the image a plant already holds")
	f.Float64Var(&cfg.Weights.Memory, "cost-memory", 1, "bid cost times the fraction of a plant's guest memory in use")
	return c
}

type vmFlags struct {
	shop, token string
}

func (f *vmFlags) client(g *globals) (shopv1.ShopServiceClient, func(), error) {
	if f.token == "" {
		return nil, nil, errors.New("no token: pass --token or set VMGRID_TOKEN (vmgrid up prints one)")
	}
	cc, err := services.Dial(f.shop, g.tls, grpc.WithPerRPCCredentials(auth.Credentials{Token: f.token, Insecure: !g.tls.Enabled()}))
	if err != nil {
		return nil, nil, err
	}
	return shopv1.NewShopServiceClient(cc), func() { cc.Close() }, nil
}

func printClassAd(w io.Writer, ad *computev1.ClassAd) {
	b, _ := protojson.MarshalOptions{Multiline: true}.Marshal(ad)
	fmt.Fprintln(w, string(b))
}

func vmCmd(g *globals) *cobra.Command {
	f := &vmFlags{shop: envOr("VMGRID_SHOP", "127.0.0.1:7060"), token: os.Getenv("VMGRID_TOKEN")}
	c := &cobra.Command{Use: "vm", Short: "Create, inspect, watch and destroy VMs through a shop"}
	c.PersistentFlags().StringVar(&f.shop, "shop", f.shop, "shop address (env VMGRID_SHOP)")
	c.PersistentFlags().StringVar(&f.token, "token", f.token, "bearer token (env VMGRID_TOKEN)")

	var req shopv1.CreateVMRequest
	var hostname, user, sshKey, dagFile string
	var execs []string
	var memory uint64
	var vcpus uint32
	create := &cobra.Command{
		Use:   "create",
		Short: "Create a VM: match a golden image, auction, clone, configure",
		Long: `Create a VM. The configuration is a DAG of actions: --hostname, --user/--ssh-key
and each --exec (in order) become a chain of actions, or --dag FILE gives a
ConfigDAG as JSON (see proto/vmgrid/compute/v1/plant.proto). --request-id
makes the call idempotent (default: a random id).`,
		Example: `  vmgrid vm create --hostname web1 --user alice --ssh-key "$(cat ~/.ssh/id_ed25519.pub)" --exec 'uname -a'`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if req.RequestId == "" {
				var b [6]byte
				_, _ = rand.Read(b[:])
				req.RequestId = "req-" + hex.EncodeToString(b[:])
			}
			req.Hardware = &computev1.Hardware{Vcpus: vcpus, MemoryMib: memory}
			dag, err := buildDAG(dagFile, hostname, user, sshKey, execs)
			if err != nil {
				return err
			}
			req.Config = dag
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			stream, err := cl.CreateVM(cmd.Context(), &req)
			if err != nil {
				return err
			}
			for {
				p, err := stream.Recv()
				if err != nil {
					return err
				}
				if p.Classad != nil {
					printClassAd(cmd.OutOrStdout(), p.Classad)
					return nil
				}
				msg := p.Message
				if len(p.Bids) > 0 {
					var bs []string
					for _, b := range p.Bids {
						if b.Refusal != "" {
							bs = append(bs, b.Plant+": refused ("+b.Refusal+")")
						} else {
							bs = append(bs, fmt.Sprintf("%s: %.1f", b.Plant, b.Cost))
						}
					}
					msg += " [" + strings.Join(bs, ", ") + "]"
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "%7s  %-9s %s\n", time.Duration(p.ElapsedNanos).Round(time.Millisecond), p.Stage, msg)
			}
		},
	}
	fl := create.Flags()
	fl.StringVar(&req.RequestId, "request-id", "", "idempotency key (default: random)")
	fl.StringVar(&req.Image, "image", "", "use this golden image (default: the best match)")
	fl.StringVar(&req.NetworkDomain, "domain", "", "client network domain")
	fl.Uint32Var(&vcpus, "vcpus", 0, "vCPUs (0: the image's)")
	fl.Uint64Var(&memory, "memory-mib", 0, "memory in MiB (0: the image's)")
	fl.StringVar(&hostname, "hostname", "", "set the guest's hostname")
	fl.StringVar(&user, "user", "", "add a user")
	fl.StringVar(&sshKey, "ssh-key", "", "SSH public key of --user")
	fl.StringArrayVar(&execs, "exec", nil, "run a shell command in the guest (repeat; in order)")
	fl.StringVar(&dagFile, "dag", "", "configuration DAG as JSON (instead of the flags above)")

	get := &cobra.Command{Use: "get VM", Short: "Print a VM's classad", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			ad, err := cl.GetVM(cmd.Context(), &shopv1.GetVMRequest{VmId: args[0]})
			if err != nil {
				return err
			}
			printClassAd(cmd.OutOrStdout(), ad)
			return nil
		}}
	ls := &cobra.Command{Use: "ls", Short: "List your VMs", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			resp, err := cl.ListVMs(cmd.Context(), &shopv1.ListVMsRequest{})
			if err != nil {
				return err
			}
			for _, ad := range resp.Vms {
				fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\t%s\t%s\n", ad.VmId, strings.TrimPrefix(ad.State.String(), "VM_STATE_"), ad.Plant, ad.Image)
			}
			return nil
		}}
	rm := &cobra.Command{Use: "rm VM...", Short: "Destroy VMs", Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			for _, id := range args {
				if _, err := cl.DestroyVM(cmd.Context(), &shopv1.DestroyVMRequest{VmId: id}); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), "destroyed", id)
			}
			return nil
		}}
	watch := &cobra.Command{Use: "watch VM", Short: "Print the classad whenever it changes", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			stream, err := cl.WatchVM(cmd.Context(), &shopv1.WatchVMRequest{VmId: args[0]})
			if err != nil {
				return err
			}
			for {
				ad, err := stream.Recv()
				if err != nil {
					if errors.Is(err, io.EOF) {
						return nil
					}
					return err
				}
				printClassAd(cmd.OutOrStdout(), ad)
			}
		}}
	c.AddCommand(create, get, ls, rm, watch)
	return c
}

func buildDAG(file, hostname, user, key string, execs []string) (*computev1.ConfigDAG, error) {
	d := &computev1.ConfigDAG{}
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		return d, protojson.Unmarshal(b, d)
	}
	var prev string
	add := func(a *computev1.Action) {
		if prev != "" {
			a.After = []string{prev}
		}
		prev = a.Id
		d.Actions = append(d.Actions, a)
	}
	if hostname != "" {
		add(&computev1.Action{Id: "hostname", Kind: &computev1.Action_SetHostname{SetHostname: &computev1.SetHostnameAction{Hostname: hostname}}})
	}
	if user != "" {
		add(&computev1.Action{Id: "user", Kind: &computev1.Action_AddUser{AddUser: &computev1.AddUserAction{User: user, SshKey: key}}})
	}
	for i, e := range execs {
		add(&computev1.Action{Id: fmt.Sprintf("exec%d", i+1), Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"sh", "-c", e}}}})
	}
	return d, nil
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
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

func upCmd(g *globals) *cobra.Command {
	var cfg grid.Config
	c := &cobra.Command{
		Use:   "up",
		Short: "Start a whole grid on this machine: etcd, image server, plants, shop",
		Long: `Start a whole grid on this machine in one process: an embedded etcd, an image
server, --plants compute servers (each with its FUSE view under --dir) and
the shop. The first start builds the tiny golden image (Debian's cloud
kernel, busybox, the guest agent: vmgrid-agent beside this binary, or this
binary) and publishes it. It writes
DIR/env with the addresses and a token, and runs until interrupted.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck
			if cfg.Golden != "" {
				if cfg.AgentPath, err = guestAgent(); err != nil {
					return err
				}
			}
			cfg.Log = log
			if cfg.Dir, err = filepath.Abs(cfg.Dir); err != nil {
				return err
			}
			gr, err := grid.Up(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			defer gr.Close()
			env := fmt.Sprintf("export VMGRID_SHOP=%s\nexport VMGRID_TOKEN=%s\nexport VMGRID_IMAGESERVER=%s\nexport VMGRID_DATASERVER=%s\nexport VMGRID_ETCD=%s\n",
				gr.Shop.Addr(), gr.Token, gr.Images.Addr(), gr.Data.Addr(), gr.Etcd.Endpoint)
			for i, p := range gr.Plants {
				env += fmt.Sprintf("export VMGRID_PLANT%d=%s\n", i, p.Server.Addr())
			}
			envFile := filepath.Join(cfg.Dir, "env")
			if err := os.WriteFile(envFile, []byte(env), 0o600); err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "vmgrid is up: shop %s, image server %s, data server %s, etcd %s, %d plants\n", gr.Shop.Addr(), gr.Images.Addr(), gr.Data.Addr(), gr.Etcd.Endpoint, len(gr.Plants))
			for i, p := range gr.Plants {
				fmt.Fprintf(out, "  plant%d %s  view %s\n", i, p.Server.Addr(), p.Mountpoint)
			}
			fmt.Fprintf(out, "owner \"demo\", tokens file %s\nuse it:  . %s && vmgrid vm create --hostname demo1\n", gr.TokensFile, envFile)
			stop := make(chan os.Signal, 1)
			signal.Notify(stop, syscall.SIGTERM, os.Interrupt)
			select {
			case <-cmd.Context().Done():
			case <-stop:
			}
			fmt.Fprintln(out, "stopping")
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.Dir, "dir", "/var/lib/vmgrid/up", "directory for everything the grid keeps (short: unix sockets live below it)")
	f.IntVar(&cfg.Plants, "plants", 2, "number of compute servers")
	f.IntVar(&cfg.ShopPort, "shop-port", 7060, "shop port (0: any)")
	f.IntVar(&cfg.ImagesPort, "images-port", 7070, "image server port (0: any)")
	f.StringVar(&cfg.Golden, "golden", "tiny", "golden image to build and publish if missing (empty: none)")
	return c
}
