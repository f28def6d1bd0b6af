package cli

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// shopService registers --shop and --token on a command group whose verbs
// talk to a shop.
func shopService(c *cobra.Command, s *service) {
	s.addrFlag(c.PersistentFlags(), "shop", "VMGRID_SHOP", "127.0.0.1:7060", "shop")
	s.tokenFlag(c.PersistentFlags(), "no token: pass --token or set VMGRID_TOKEN (vmgrid up prints one)")
}

func shopClient(g *globals, s *service) (shopv1.ShopServiceClient, func(), error) {
	return connect(g, s, shopv1.NewShopServiceClient)
}

func vmCmd(g *globals) *cobra.Command {
	s := &service{}
	c := group(&cobra.Command{Use: "vm", Short: "Create, inspect, watch and destroy VMs through a shop"},
		vmCreateCmd(g, s), vmGetCmd(g, s), vmListCmd(g, s), vmRmCmd(g, s), vmWatchCmd(g, s))
	shopService(c, s)
	return c
}

func printClassAd(w io.Writer, ad *computev1.ClassAd) {
	b, _ := protojson.MarshalOptions{Multiline: true}.Marshal(ad)
	fmt.Fprintln(w, string(b))
}

// dagFlags are the ways to give a configuration DAG on the command line.
type dagFlags struct {
	hostname, user, sshKey, file string
	execs                        []string
}

func (d *dagFlags) build() (*computev1.ConfigDAG, error) {
	return buildDAG(d.file, d.hostname, d.user, d.sshKey, d.execs)
}

func randomID(prefix string) string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

func vmCreateCmd(g *globals, s *service) *cobra.Command {
	var req shopv1.CreateVMRequest
	var d dagFlags
	var memory uint64
	var vcpus uint32
	c := &cobra.Command{
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
				req.RequestId = randomID("req-")
			}
			req.Hardware = &computev1.Hardware{Vcpus: vcpus, MemoryMib: memory}
			dag, err := d.build()
			if err != nil {
				return err
			}
			req.Config = dag
			cl, done, err := shopClient(g, s)
			if err != nil {
				return err
			}
			defer done()
			return createVM(cmd, cl, &req)
		},
	}
	fl := c.Flags()
	fl.StringVar(&req.RequestId, "request-id", "", "idempotency key (default: random)")
	fl.StringVar(&req.Image, "image", "", "use this golden image (default: the best match)")
	fl.StringVar(&req.NetworkDomain, "domain", "", "client network domain")
	fl.Uint32Var(&vcpus, "vcpus", 0, "vCPUs (0: the image's)")
	fl.Uint64Var(&memory, "memory-mib", 0, "memory in MiB (0: the image's)")
	fl.StringVar(&d.hostname, "hostname", "", "set the guest's hostname")
	fl.StringVar(&d.user, "user", "", "add a user")
	fl.StringVar(&d.sshKey, "ssh-key", "", "SSH public key of --user")
	fl.StringArrayVar(&d.execs, "exec", nil, "run a shell command in the guest (repeat; in order)")
	fl.StringVar(&d.file, "dag", "", "file holding a configuration DAG as JSON (instead of the flags above)")
	return c
}

// createVM follows the creation's progress on stderr and prints the
// classad.
func createVM(cmd *cobra.Command, cl shopv1.ShopServiceClient, req *shopv1.CreateVMRequest) error {
	stream, err := cl.CreateVM(cmd.Context(), req)
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
			msg += " [" + strings.Join(bidList(p.Bids), ", ") + "]"
		}
		fmt.Fprintf(cmd.ErrOrStderr(), "%7s  %-9s %s\n", time.Duration(p.ElapsedNanos).Round(time.Millisecond), p.Stage, msg)
	}
}

func bidList(bids []*shopv1.Bid) []string {
	var bs []string
	for _, b := range bids {
		if b.Refusal != "" {
			bs = append(bs, b.Plant+": refused ("+b.Refusal+")")
		} else {
			bs = append(bs, fmt.Sprintf("%s: %.1f", b.Plant, b.Cost))
		}
	}
	return bs
}

func vmGetCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{Use: "get VM", Short: "Print a VM's classad", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, done, err := shopClient(g, s)
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
}

func vmListCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{Use: "ls", Short: "List your VMs", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, done, err := shopClient(g, s)
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
}

func vmRmCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{Use: "rm VM...", Short: "Destroy VMs", Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, done, err := shopClient(g, s)
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
}

func vmWatchCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{Use: "watch VM", Short: "Print the classad whenever it changes", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, done, err := shopClient(g, s)
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
