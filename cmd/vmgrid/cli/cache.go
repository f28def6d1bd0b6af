package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

func cacheCmd(g *globals) *cobra.Command {
	s := &service{}
	c := group(&cobra.Command{Use: "cache", Short: "Flush, inspect and empty a compute server's caches"},
		cacheFlushCmd(g, s), cacheStatsCmd(g, s), cacheDropCmd(g, s))
	s.addrFlag(c.PersistentFlags(), "server", "VMGRID_COMPUTESERVER", "127.0.0.1:7080", "compute server")
	s.operatorTokenFlag(c.PersistentFlags())
	return c
}

func cacheClient(g *globals, s *service) (computev1.CacheServiceClient, func(), error) {
	return connect(g, s, computev1.NewCacheServiceClient)
}

func cacheFlushCmd(g *globals, s *service) *cobra.Command {
	var disk string
	c := &cobra.Command{
		Use:   "flush",
		Short: "Write dirty blocks of persistent disks back to the image server",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, done, err := cacheClient(g, s)
			if err != nil {
				return err
			}
			defer done()
			resp, err := cl.Flush(cmd.Context(), &computev1.FlushRequest{Disk: disk})
			if err != nil {
				return err
			}
			if len(resp.Disks) == 0 {
				fmt.Fprintln(cmd.OutOrStdout(), "nothing to write back")
			}
			for _, d := range resp.Disks {
				fmt.Fprintf(cmd.OutOrStdout(), "%s: %d blocks (%s) written back, generation %d\n", d.Disk, d.Blocks, humanBytes(d.Bytes), d.Generation)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "took %s\n", time.Duration(resp.TookNanos).Round(time.Millisecond))
			return nil
		},
	}
	c.Flags().StringVar(&disk, "disk", "", "only this disk (default: every disk)")
	return c
}

func cacheStatsCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{
		Use:   "stats",
		Short: "Print cache counters as JSON",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, done, err := cacheClient(g, s)
			if err != nil {
				return err
			}
			defer done()
			resp, err := cl.GetCacheStats(cmd.Context(), &computev1.GetCacheStatsRequest{})
			if err != nil {
				return err
			}
			b, _ := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(resp)
			fmt.Fprintln(cmd.OutOrStdout(), string(b))
			return nil
		},
	}
}

func cacheDropCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{
		Use:   "drop",
		Short: "Empty the clean caches (block cache, file cache, kernel page cache of the view); dirty blocks stay",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, done, err := cacheClient(g, s)
			if err != nil {
				return err
			}
			defer done()
			resp, err := cl.DropCaches(cmd.Context(), &computev1.DropCachesRequest{})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "dropped %d blocks and %d files\n", resp.BlocksDropped, resp.FilesDropped)
			return nil
		},
	}
}
