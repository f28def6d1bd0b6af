package cli

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// shopService registers --shop and --token on a command group whose verbs
// talk to a shop.
func shopService(c *cobra.Command, s *service) {
	s.addrFlag(c.PersistentFlags(), "shop", "VMGRID_SHOP", "127.0.0.1:7060", "shop", func(cx *clientContext) []string { return []string{cx.Shop} })
	s.tokenFlag(c.PersistentFlags(), "no token: pass --token or set VMGRID_TOKEN (vmgrid up prints one and writes a context)")
}

// shopVerb is a verb's RunE with a shop client.
func shopVerb(g *globals, s *service, fn verbFunc[shopv1.ShopServiceClient]) func(*cobra.Command, []string) error {
	return withClient(g, s, shopv1.NewShopServiceClient, fn)
}

func vmCmd(g *globals) *cobra.Command {
	s := &service{}
	c := group(&cobra.Command{Use: "vm", Short: "Create, inspect, watch, reach and destroy VMs through a shop"},
		append(append([]*cobra.Command{vmCreateCmd(g, s), vmGetCmd(g, s), vmListCmd(g, s), vmRmCmd(g, s), vmWatchCmd(g, s), vmMigrateCmd(g, s)}, vmAccessCmds(g, s)...), vmVerbCmds(g, s)...)...)
	shopService(c, s)
	return c
}

// vmColumns are the table of vm ls and vm get.
var vmColumns = []column[*computev1.ClassAd]{
	{name: "VM", value: func(a *computev1.ClassAd) string { return a.VmId }},
	{name: "OWNER", value: func(a *computev1.ClassAd) string { return a.Owner }},
	{name: "STATE", value: func(a *computev1.ClassAd) string { return vmState(a.State) }},
	{name: "PLANT", value: func(a *computev1.ClassAd) string { return dash(a.Plant) }},
	{name: "IMAGE", value: func(a *computev1.ClassAd) string { return dash(a.Image) }},
	{name: "READY", value: func(a *computev1.ClassAd) string { return nanos(a.ReadyNanos) }},
	{name: "AGE", value: func(a *computev1.ClassAd) string { return age(a.CreatedUnixNano) }},
	{name: "VCPUS", wide: true, value: func(a *computev1.ClassAd) string { return fmt.Sprint(a.GetHardware().GetVcpus()) }},
	{name: "MEMORY", wide: true, value: func(a *computev1.ClassAd) string { return fmt.Sprintf("%dMiB", a.GetHardware().GetMemoryMib()) }},
	{name: "FETCHED", wide: true, value: func(a *computev1.ClassAd) string { return humanBytes(a.FetchedBytes) }},
	{name: "DOMAIN", wide: true, value: func(a *computev1.ClassAd) string { return dash(a.GetNetwork().GetDomain()) }},
	{name: "ADDRESS", wide: true, value: func(a *computev1.ClassAd) string { return dash(a.GetNetwork().GetAddress()) }},
	{name: "ERROR", wide: true, value: func(a *computev1.ClassAd) string { return dash(a.Error) }},
}

func vmState(st computev1.VMState) string { return strings.TrimPrefix(st.String(), "VM_STATE_") }

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
	var o output
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
			return shopVerb(g, s, func(cmd *cobra.Command, _ []string, cl shopv1.ShopServiceClient) error {
				return createVM(cmd, cl, &req, &o)
			})(cmd, nil)
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
	fl.BoolVar(&req.Persistent, "persistent", false, "root on a persistent disk written back to the image server (VM_ID-root): the VM can be suspended and resumed elsewhere")
	o.register(c)
	return c
}

// createVM follows the creation's progress on stderr and prints the
// classad.
func createVM(cmd *cobra.Command, cl shopv1.ShopServiceClient, req *shopv1.CreateVMRequest, o *output) error {
	stream, err := cl.CreateVM(cmd.Context(), req)
	if err != nil {
		return err
	}
	return followVM(cmd, stream.Recv, o, "creation")
}

// followVM prints a creation's (or a resume's) progress on stderr and the
// classad its last message carries.
func followVM(cmd *cobra.Command, recv func() (*shopv1.CreateVMProgress, error), o *output, what string) error {
	var ad *computev1.ClassAd
	err := follow(recv, func(p *shopv1.CreateVMProgress) error {
		if p.Classad != nil {
			ad = p.Classad
			return errStop
		}
		msg := p.Message
		if len(p.Bids) > 0 {
			msg += " [" + strings.Join(bidList(p.Bids), ", ") + "]"
		}
		fmt.Fprintf(cmd.ErrOrStderr(), "%7s  %-9s %s\n", time.Duration(p.ElapsedNanos).Round(time.Millisecond), p.Stage, msg)
		return nil
	})
	if err != nil {
		return err
	}
	if ad == nil {
		return fmt.Errorf("the shop ended the %s without a classad", what)
	}
	return printItems(cmd.OutOrStdout(), o, ad, []*computev1.ClassAd{ad}, vmColumns)
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
	var o output
	c := &cobra.Command{Use: "get VM", Aliases: []string{"show"}, Short: "Print a VM's classad", Args: cobra.ExactArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			return show(cmd, &o, vmColumns)(cl.GetVM(cmd.Context(), &shopv1.GetVMRequest{VmId: args[0]}))
		})}
	o.register(c)
	return c
}

func vmListCmd(g *globals, s *service) *cobra.Command {
	var o output
	var all bool
	list := shopVerb(g, s, func(cmd *cobra.Command, _ []string, cl shopv1.ShopServiceClient) error {
		resp, err := cl.ListVMs(cmd.Context(), &shopv1.ListVMsRequest{All: all})
		if err != nil {
			return err
		}
		return printItems(cmd.OutOrStdout(), &o, resp, resp.Vms, vmColumns)
	})
	c := &cobra.Command{Use: "ls", Aliases: []string{"list"}, Short: "List your VMs (--all: every owner's, for operators)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			s.operator = all // every owner's VMs take the operator's token
			return list(cmd, args)
		}}
	c.Flags().BoolVarP(&all, "all", "A", false, "every owner's VMs (an operator token: --token, VMGRID_OPERATOR_TOKEN or the context's)")
	o.register(c)
	return c
}

func vmRmCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{Use: "rm VM...", Aliases: []string{"delete"}, Short: "Destroy VMs", Args: cobra.MinimumNArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			return each(cmd, args, "destroyed", func(id string) error {
				_, err := cl.DestroyVM(cmd.Context(), &shopv1.DestroyVMRequest{VmId: id})
				return err
			})
		})}
}

func vmWatchCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{Use: "watch VM", Short: "Print what changes in a VM's classad (state transitions, changed fields)", Args: cobra.ExactArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			stream, err := cl.WatchVM(cmd.Context(), &shopv1.WatchVMRequest{VmId: args[0]})
			if err != nil {
				return err
			}
			start := time.Now()
			var prev proto.Message // nil: the first classad prints every field
			return follow(stream.Recv, func(ad *computev1.ClassAd) error {
				for _, ch := range changes(prev, ad) {
					fmt.Fprintf(cmd.OutOrStdout(), "%7s  %s\n", time.Since(start).Round(time.Millisecond), ch)
				}
				prev = ad
				return nil
			})
		})}
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
