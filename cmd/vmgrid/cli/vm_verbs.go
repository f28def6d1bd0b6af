package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// The verbs that move a VM's state: suspend, resume, publish.
func vmVerbCmds(g *globals, s *service) []*cobra.Command {
	return []*cobra.Command{vmSuspendCmd(g, s), vmResumeCmd(g, s), vmPublishCmd(g, s)}
}

func vmSuspendCmd(g *globals, s *service) *cobra.Command {
	var o output
	var requestID string
	c := &cobra.Command{
		Use:   "suspend VM",
		Short: "Suspend a persistent VM: its disk written back, its memory state an image; it leaves its plant",
		Long: `Suspend a persistent VM (vmgrid vm create --persistent): its plant saves the
guest's memory state as an image on the image server, writes its disk changes
back and frees what it held. The classad says SUSPENDED, with the state image
(suspended_image) and the disk (persistent_disk). Resume it on any plant with
vmgrid vm resume. --request-id makes the call idempotent (default: random).`,
		Args: cobra.ExactArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			return show(cmd, &o, vmColumns)(cl.SuspendVM(cmd.Context(), &shopv1.SuspendVMRequest{VmId: args[0], RequestId: orRandom(requestID)}))
		}),
	}
	c.Flags().StringVar(&requestID, "request-id", "", "idempotency key (default: random)")
	o.register(c)
	return c
}

func vmResumeCmd(g *globals, s *service) *cobra.Command {
	var o output
	var req shopv1.ResumeVMRequest
	c := &cobra.Command{
		Use:   "resume VM",
		Short: "Resume a suspended VM on a plant (--to PLANT, or the winner of an auction)",
		Long: `Resume a suspended VM: on the plant --to names, or on the winner of an
auction as vm create places VMs. The plant restores its memory state and
boots it from its persistent disk; progress is printed as vm create prints
it, then the classad (RUNNING on its new plant). --request-id makes the call
idempotent (default: random).`,
		Example: `  vmgrid vm resume vm-0123456789 --to plant1`,
		Args:    cobra.ExactArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			req.VmId, req.RequestId = args[0], orRandom(req.RequestId)
			stream, err := cl.ResumeVM(cmd.Context(), &req)
			if err != nil {
				return err
			}
			return followVM(cmd, stream.Recv, &o, "resume")
		}),
	}
	c.Flags().StringVar(&req.Plant, "to", "", "resume on this plant (default: by auction)")
	c.Flags().StringVar(&req.RequestId, "request-id", "", "idempotency key (default: random)")
	o.register(c)
	return c
}

// publishColumns are the table of vm publish.
var publishColumns = []column[*shopv1.PublishVMResponse]{
	{name: "IMAGE", value: func(r *shopv1.PublishVMResponse) string { return r.GetImage().GetName() }},
	{name: "VM", value: func(r *shopv1.PublishVMResponse) string { return r.GetClassad().GetVmId() }},
	{name: "STATE", value: func(r *shopv1.PublishVMResponse) string { return vmState(r.GetClassad().GetState()) }},
	{name: "ACTIONS", value: func(r *shopv1.PublishVMResponse) string {
		return fmt.Sprint(len(r.GetImage().GetAttributes().GetActions()))
	}},
	{name: "PAUSED", value: func(r *shopv1.PublishVMResponse) string { return nanos(r.PausedNanos) }},
	{name: "PUBLISHED", value: func(r *shopv1.PublishVMResponse) string { return humanBytes(r.PublishedBytes) }},
}

func vmPublishCmd(g *globals, s *service) *cobra.Command {
	var o output
	var req shopv1.PublishVMRequest
	c := &cobra.Command{
		Use:   "publish VM NAME",
		Short: "Make a running VM a golden image NAME (yours); the VM runs on",
		Long: `Publish a running VM as the golden image NAME, the way a configured machine
becomes a template: its disk (the redo log folded into its golden disk) and
its memory state are saved at one instant, with its RAM as a file where its
image had one, and the image records the configuration actions the VM
performed, so vm create requests whose DAG starts with them are matched to
it and skip them. The guest pauses while its state is saved and then runs
on. The image is yours: only you (and the grid's operators and services)
see it, match it and read it. NAME must be new. --request-id makes the call idempotent (default:
random).`,
		Example: `  vmgrid vm publish vm-0123456789 web-base --label role=web`,
		Args:    cobra.ExactArgs(2),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			req.VmId, req.Name, req.RequestId = args[0], args[1], orRandom(req.RequestId)
			start := time.Now()
			resp, err := cl.PublishVM(cmd.Context(), &req)
			if err == nil {
				fmt.Fprintf(cmd.ErrOrStderr(), "published %s in %v (the guest paused %v)\n", args[1], time.Since(start).Round(time.Millisecond), time.Duration(resp.PausedNanos).Round(time.Millisecond))
			}
			return show(cmd, &o, publishColumns)(resp, err)
		}),
	}
	c.Flags().StringToStringVar(&req.Labels, "label", nil, "label the image KEY=VALUE (repeat)")
	c.Flags().StringVar(&req.RequestId, "request-id", "", "idempotency key (default: random)")
	o.register(c)
	return c
}

func orRandom(requestID string) string {
	if requestID == "" {
		return randomID("req-")
	}
	return requestID
}
