package cli

import (
	"context"

	"github.com/spf13/cobra"

	"github.com/vmgrid/vmgrid/computeserver"
)

func computeserverCmd(g *globals) *cobra.Command {
	cfg := computeserver.DefaultConfig()
	c := serverCmd(g, &cobra.Command{
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
	}, &cfg.Server, func(ctx context.Context) error {
		cfg.UpstreamTLS = g.tls
		return serve(ctx, computeserver.Start, cfg)
	})
	cfg.AddFlags(c.Flags())
	return c
}
