package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

func plantCmd(g *globals) *cobra.Command {
	s := &service{}
	c := group(&cobra.Command{Use: "plant", Short: "Operate the grid's plants through a shop (operators)"}, plantDrainCmd(g, s))
	s.addrFlag(c.PersistentFlags(), "shop", "VMGRID_SHOP", "127.0.0.1:7060", "shop", func(cx *clientContext) []string { return []string{cx.Shop} })
	s.operatorTokenFlag(c.PersistentFlags())
	return c
}

func plantDrainCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{
		Use:   "drain PLANT",
		Short: "Drain a plant: no new VMs there, its running VMs live-migrated to other plants",
		Long: `Drain a plant (ShopService.DrainPlant, operators only): it takes no new VMs
(it refuses every auction, creation, resume and incoming migration) and the
shops live-migrate its running VMs to other plants, one shop per VM, as when
the plant is asked to stop (SIGTERM, --drain-timeout). A VM that cannot
move live, or that no other plant has room for, stays (the shops retry). The
plant stays up, draining, until it is stopped; restart it to take VMs again.
'vmgrid vm ls' shows where the VMs went.`,
		Example: `  vmgrid plant drain plant2`,
		Args:    cobra.ExactArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			resp, err := cl.DrainPlant(cmd.Context(), &shopv1.DrainPlantRequest{Plant: args[0]})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "plant %s is draining: the shops move its %d VMs to other plants\n", args[0], resp.Vms)
			return nil
		}),
	}
}
