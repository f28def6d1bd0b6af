package cli

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services"
)

// sizeValue is a byte size flag that accepts 4GiB, 64KiB, 512MiB or bytes.
type sizeValue struct{ n *int64 }

func (s sizeValue) String() string { return humanBytes(uint64(*s.n)) }
func (s sizeValue) Type() string   { return "size" }
func (s sizeValue) Set(v string) error {
	n, err := parseSize(v)
	if err != nil {
		return err
	}
	*s.n = n
	return nil
}

func parseSize(v string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1}}
	s := strings.TrimSpace(v)
	mult := int64(1)
	for _, u := range units {
		if rest, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = strings.TrimSpace(rest), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("size %q: want a number of bytes with an optional unit (KiB, MiB, GiB, TiB)", v)
	}
	return n * mult, nil
}

func cacheFlags(f *pflag.FlagSet, c *gvfs.CacheConfig) {
	c.Capacity, c.Ways = 4<<30, 8
	bs := int64(64 << 10)
	f.Var(sizeValue{&c.Capacity}, "cache-size", "capacity of the disk block cache")
	f.IntVar(&c.Ways, "cache-ways", 8, "associativity of the disk block cache (frames per set)")
	f.Var(blockSizeValue{&c.BlockSize, &bs}, "cache-block-size", "frame size of the disk block cache, a power of two from 4KiB to 1MiB")
	c.BlockSize = int(bs)
}

type blockSizeValue struct {
	dst *int
	n   *int64
}

func (b blockSizeValue) String() string { return humanBytes(uint64(*b.n)) }
func (b blockSizeValue) Type() string   { return "size" }
func (b blockSizeValue) Set(v string) error {
	if err := (sizeValue{b.n}).Set(v); err != nil {
		return err
	}
	*b.dst = int(*b.n)
	return nil
}

func computeserverCmd(g *globals) *cobra.Command {
	var cfg computeserver.Config
	c := &cobra.Command{
		Use:   "computeserver",
		Short: "Run a compute server (plant): FUSE view of images with its caches, and the production line",
		Long: `Run a compute server. It mounts a FUSE view at --mountpoint where every image
of the upstream appears as MOUNTPOINT/IMAGE/FILE: golden files read-only,
persistent disks read-write. A VM monitor opens these as ordinary files;
reads are answered from zero-block meta-data, the disk block cache, the
file cache (whole-file policy, fetched compressed) or the upstream.

Writes to persistent disks stay in the cache as dirty blocks (durable
across a crash) until written back: on 'vmgrid cache flush', on SIGUSR1,
after --flush-idle without writes, and at shutdown.

The upstream is an image server or a 'vmgrid cacheproxy' in front of one.

It is also a plant (PlantService): it clones golden images into QEMU guests
(a qcow2 redo log over the golden disk on the view, the memory state
restored through it), configures them through the guest agent, and
suspends/resumes persistent VMs. With --etcd it registers in the shop's
registry and bids in its auctions; --dataserver lets it stage task files
in and out of that data server, with the task credentials the shop sends.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck
			cfg.Server.Name, cfg.Server.Logger, cfg.Server.TLS, cfg.UpstreamTLS = "computeserver", log, g.tls, g.tls
			return computeserver.Run(cmd.Context(), cfg)
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.Server.Listen, "listen", "127.0.0.1:7080", "gRPC address to listen on")
	f.StringVar(&cfg.Server.MetricsListen, "metrics-listen", "127.0.0.1:9080", "Prometheus /metrics address (empty: off)")
	f.StringVar(&cfg.Upstream, "upstream", "127.0.0.1:7070", "image server or cache proxy to read from")
	f.BoolVar(&cfg.Compress, "compress", false, "ask the upstream for zstd-compressed blocks (for slow links)")
	f.StringVar(&cfg.DataDir, "data-dir", "/var/lib/vmgrid/compute", "directory for the caches")
	f.StringVar(&cfg.Mountpoint, "mountpoint", "", "where to mount the FUSE view (default DATA-DIR/mnt)")
	f.DurationVar(&cfg.FlushIdle, "flush-idle", 30*time.Second, "write dirty disks back after this long without writes (negative: never on idle)")
	f.IntVar(&cfg.ReadAhead, "read-ahead", 32<<20, "bytes to fetch ahead of a sequential reader")
	f.StringVar(&cfg.Name, "name", "", "plant name in classads and bids (default: HOST-DATADIR)")
	f.StringSliceVar(&cfg.Etcd, "etcd", nil, "etcd endpoints: register there and bid in the shop's auctions")
	f.Uint64Var(&cfg.GuestMemoryMiB, "guest-memory-mib", 0, "memory guests may use in all (0: 80% of RAM)")
	f.StringVar(&cfg.DataServer, "dataserver", "", "data server of task stage-in/out (requests bring task credentials for it; empty: no staging)")
	cacheFlags(f, &cfg.Cache)
	return c
}

func cacheCmd(g *globals) *cobra.Command {
	var server string
	def := os.Getenv("VMGRID_COMPUTESERVER")
	if def == "" {
		def = "127.0.0.1:7080"
	}
	client := func() (computev1.CacheServiceClient, func(), error) {
		cc, err := services.Dial(server, g.tls)
		if err != nil {
			return nil, nil, err
		}
		return computev1.NewCacheServiceClient(cc), func() { cc.Close() }, nil
	}
	c := &cobra.Command{Use: "cache", Short: "Flush, inspect and empty a compute server's caches"}
	c.PersistentFlags().StringVar(&server, "server", def, "compute server address (env VMGRID_COMPUTESERVER)")
	var disk string
	flush := &cobra.Command{
		Use:   "flush",
		Short: "Write dirty blocks of persistent disks back to the image server",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, done, err := client()
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
	flush.Flags().StringVar(&disk, "disk", "", "only this disk (default: every disk)")
	stats := &cobra.Command{
		Use:   "stats",
		Short: "Print cache counters as JSON",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, done, err := client()
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
	drop := &cobra.Command{
		Use:   "drop",
		Short: "Empty the clean caches (block cache, file cache, kernel page cache of the view); dirty blocks stay",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, done, err := client()
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
	c.AddCommand(flush, stats, drop)
	return c
}

func cacheproxyCmd(g *globals) *cobra.Command {
	var cfg computeserver.CacheProxyConfig
	c := &cobra.Command{
		Use:   "cacheproxy",
		Short: "Run a cache proxy: the image read API served from a local cache (a second-level LAN cache)",
		Long: `Run a cache proxy in front of an image server (or another proxy). It serves
the same ImageService API: block and whole-file reads come from its disk
block cache and file cache, misses are fetched from --upstream once, and
everything else (publish, write-back, delete) is forwarded. Compute
servers in one LAN point --upstream at a shared proxy to share its warm
cache in front of a distant image server; proxies can be chained.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck
			cfg.Server.Name, cfg.Server.Logger, cfg.Server.TLS, cfg.UpstreamTLS = "cacheproxy", log, g.tls, g.tls
			return computeserver.RunCacheProxy(cmd.Context(), cfg)
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.Server.Listen, "listen", "127.0.0.1:7071", "gRPC address to listen on")
	f.StringVar(&cfg.Server.MetricsListen, "metrics-listen", "127.0.0.1:9071", "Prometheus /metrics address (empty: off)")
	f.StringVar(&cfg.Upstream, "upstream", "127.0.0.1:7070", "image server or cache proxy to read from")
	f.BoolVar(&cfg.Compress, "compress", false, "ask the upstream for zstd-compressed blocks (for slow links)")
	f.StringVar(&cfg.DataDir, "data-dir", "/var/lib/vmgrid/cacheproxy", "directory for the caches")
	f.IntVar(&cfg.ReadAhead, "read-ahead", 32<<20, "bytes to fetch ahead of a sequential reader")
	cacheFlags(f, &cfg.Cache)
	return c
}
