package cli

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

func cacheCmd(g *globals) *cobra.Command {
	s := &service{}
	c := group(&cobra.Command{Use: "cache", Short: "Flush, inspect and empty compute servers' caches",
		Long: `Flush, inspect and empty the caches of compute servers: each verb acts on
every address of --server in turn (a comma-separated list; vmgrid up puts its
plants into VMGRID_COMPUTESERVER and its context).`},
		cacheFlushCmd(g, s), cacheStatsCmd(g, s), cacheDropCmd(g, s))
	s.addrFlag(c.PersistentFlags(), "server", "VMGRID_COMPUTESERVER", "127.0.0.1:7080", "compute server",
		func(cx *clientContext) []string { return cx.ComputeServers })
	s.addrs.flag.Usage = "compute server addresses, comma-separated (env VMGRID_COMPUTESERVER, else the context's compute servers)"
	s.operatorTokenFlag(c.PersistentFlags())
	return c
}

// cacheVerb is a verb's RunE that calls fn with a client of each compute
// server of --server, in order.
func cacheVerb(g *globals, s *service, fn func(cmd *cobra.Command, addr string, cl computev1.CacheServiceClient) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		addrs, err := s.addrList(g)
		if err != nil {
			return err
		}
		for _, addr := range addrs {
			err := callAt(g, s, addr, computev1.NewCacheServiceClient, func(cl computev1.CacheServiceClient) error {
				return fn(cmd, addr, cl)
			})
			if err != nil {
				return err
			}
		}
		return nil
	}
}

func cacheFlushCmd(g *globals, s *service) *cobra.Command {
	var disk string
	c := &cobra.Command{
		Use:   "flush",
		Short: "Write dirty blocks of persistent disks back to the image server",
		Args:  cobra.NoArgs,
		RunE: cacheVerb(g, s, func(cmd *cobra.Command, addr string, cl computev1.CacheServiceClient) error {
			resp, err := cl.Flush(cmd.Context(), &computev1.FlushRequest{Disk: disk})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if len(resp.Disks) == 0 {
				fmt.Fprintf(out, "%s: nothing to write back\n", addr)
			}
			for _, d := range resp.Disks {
				fmt.Fprintf(out, "%s: %s: %d blocks (%s) written back, generation %d\n", addr, d.Disk, d.Blocks, humanBytes(d.Bytes), d.Generation)
			}
			fmt.Fprintf(out, "%s: took %s\n", addr, time.Duration(resp.TookNanos).Round(time.Millisecond))
			return nil
		}),
	}
	c.Flags().StringVar(&disk, "disk", "", "only this disk (default: every disk)")
	return c
}

// serverStats is one compute server's counters, as cache stats prints
// them.
type serverStats struct {
	Server string                           `json:"server"`
	Stats  *computev1.GetCacheStatsResponse `json:"-"`
	JSON   json.RawMessage                  `json:"stats"`
}

func hitRate(st *computev1.GetCacheStatsResponse) string {
	if st.Hits+st.Misses == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100*float64(st.Hits)/float64(st.Hits+st.Misses))
}

var cacheColumns = []column[serverStats]{
	{name: "SERVER", value: func(s serverStats) string { return s.Server }},
	{name: "HITS", value: func(s serverStats) string { return fmt.Sprint(s.Stats.Hits) }},
	{name: "MISSES", value: func(s serverStats) string { return fmt.Sprint(s.Stats.Misses) }},
	{name: "HIT-RATE", value: func(s serverStats) string { return hitRate(s.Stats) }},
	{name: "FETCHED", value: func(s serverStats) string { return humanBytes(s.Stats.FetchedBytes) }},
	{name: "CACHED", value: func(s serverStats) string { return fmt.Sprintf("%d/%d", s.Stats.CachedBlocks, s.Stats.CapacityBlocks) }},
	{name: "DIRTY", value: func(s serverStats) string { return humanBytes(s.Stats.DirtyBytes) }},
	{name: "ZERO-BLOCKS", wide: true, value: func(s serverStats) string { return fmt.Sprint(s.Stats.ZeroBlocks) }},
	{name: "COLLAPSED", wide: true, value: func(s serverStats) string { return fmt.Sprint(s.Stats.Collapsed) }},
	{name: "FILE-CACHE", wide: true, value: func(s serverStats) string { return humanBytes(s.Stats.FileCacheBytes) }},
	{name: "BLOCK-SIZE", wide: true, value: func(s serverStats) string { return humanBytes(uint64(s.Stats.BlockSize)) }},
	{name: "UPSTREAM", wide: true, value: func(s serverStats) string { return dash(s.Stats.Upstream) }},
}

func cacheStatsCmd(g *globals, s *service) *cobra.Command {
	var o output
	var all []serverStats
	get := cacheVerb(g, s, func(cmd *cobra.Command, addr string, cl computev1.CacheServiceClient) error {
		resp, err := cl.GetCacheStats(cmd.Context(), &computev1.GetCacheStatsRequest{})
		all = append(all, serverStats{Server: addr, Stats: resp, JSON: rawJSON(resp)})
		return err
	})
	c := &cobra.Command{
		Use:   "stats",
		Short: "Print cache counters (-o json: a list of {server, stats})",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := get(cmd, args); err != nil {
				return err
			}
			return printItems(cmd.OutOrStdout(), &o, all, all, cacheColumns)
		},
	}
	o.register(c)
	return c
}

func cacheDropCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{
		Use:   "drop",
		Short: "Empty the clean caches (block cache, file cache, kernel page cache of the view); dirty blocks stay",
		Args:  cobra.NoArgs,
		RunE: cacheVerb(g, s, func(cmd *cobra.Command, addr string, cl computev1.CacheServiceClient) error {
			resp, err := cl.DropCaches(cmd.Context(), &computev1.DropCachesRequest{})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: dropped %d blocks and %d files\n", addr, resp.BlocksDropped, resp.FilesDropped)
			return nil
		}),
	}
}
