package cli

import (
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

func vmMigrateCmd(g *globals, s *service) *cobra.Command {
	var req shopv1.MigrateVMRequest
	var o output
	c := &cobra.Command{
		Use:   "migrate VM",
		Short: "Move a running VM to another plant while it runs (live migration)",
		Long: `Move a running VM to another plant while it runs (Goiri et al. §4, QEMU live
migration): only its memory and its redo log's written blocks move between
the plants, never the golden image; its address, connections and clock stay.
Without --to the shop holds an auction that leaves out the VM's plant. The
progress goes to stderr (phases placing, preparing, mirroring, copying,
switching, running), then the classad on its new plant. A migration that
fails leaves the VM running where it was.`,
		Example: `  vmgrid vm migrate vm-0123456789 --to plant2`,
		Args:    cobra.ExactArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			req.VmId = args[0]
			return migrateVM(cmd, cl, &req, &o)
		}),
	}
	c.Flags().StringVar(&req.To, "to", "", "destination plant (default: the auction's winner among the other plants)")
	c.Flags().BoolVar(&req.PostCopy, "post-copy", false, "switch to post-copy after the first pass over RAM (the guest runs on the destination at once, the rest of its RAM follows on demand)")
	o.register(c)
	return c
}

// migrateVM follows a migration's progress on stderr and prints the
// classad.
func migrateVM(cmd *cobra.Command, cl shopv1.ShopServiceClient, req *shopv1.MigrateVMRequest, o *output) error {
	stream, err := cl.MigrateVM(cmd.Context(), req)
	if err != nil {
		return err
	}
	var ad *computev1.ClassAd
	last := ""
	err = follow(stream.Recv, func(p *shopv1.MigrateVMProgress) error {
		if p.Classad != nil {
			ad = p.Classad
			return errStop
		}
		// RAM rounds come every 10 ms: a line per phase and message.
		line := p.Phase + " " + p.Message
		if line == last {
			return nil
		}
		last = line
		fmt.Fprintf(cmd.ErrOrStderr(), "%7s  %-9s %s%s\n", time.Duration(p.ElapsedNanos).Round(time.Millisecond), p.Phase, p.Message, statsLine(p.Stats))
		return nil
	})
	if err != nil {
		return err
	}
	if ad == nil {
		return errors.New("the shop ended the migration without a classad")
	}
	if st := ad.LastMigration; st != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "migrated in %s: downtime %s (QEMU %d ms), RAM %s, disk %s, %s between the plants\n",
			time.Duration(st.TotalNanos).Round(time.Millisecond), time.Duration(st.DowntimeNanos).Round(time.Millisecond), st.QemuDowntimeMs,
			humanBytes(st.RamBytes), humanBytes(st.DiskBytes), humanBytes(st.MovedBytes))
	}
	return printItems(cmd.OutOrStdout(), o, ad, []*computev1.ClassAd{ad}, vmColumns)
}

func statsLine(st *computev1.MigrationStats) string {
	if st == nil || st.RamBytes == 0 {
		return ""
	}
	return fmt.Sprintf(" (RAM %s of %s sent, pass %d)", humanBytes(st.RamBytes), humanBytes(st.RamTotalBytes), st.DirtySyncCount)
}
