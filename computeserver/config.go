package computeserver

import (
	"github.com/spf13/pflag"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vnet"
	"github.com/vmgrid/vmgrid/services"
)

// DefaultConfig is the compute server's defaults, the ones its flags show.
func DefaultConfig() Config {
	return Config{
		Server:          services.Options{Name: "computeserver", Listen: "127.0.0.1:7080", MetricsListen: "127.0.0.1:9080"},
		Upstream:        "127.0.0.1:7070",
		DataDir:         "/var/lib/vmgrid/compute",
		Proxy:           gvfs.DefaultConfig(),
		Network:         vnet.DefaultConfig(),
		MemoryRestore:   string(plant.RestoreAuto),
		MemoryReadAhead: DefaultMemoryReadAhead,
		DrainTimeout:    DefaultDrainTimeout,
	}
}

// AddFlags registers the compute server's flags with c's values as
// defaults.
func (c *Config) AddFlags(fs *pflag.FlagSet) {
	c.Server.AddFlags(fs)
	addUpstreamFlags(fs, &c.Upstream, &c.Compress)
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "directory for the caches")
	fs.StringVar(&c.Mountpoint, "mountpoint", c.Mountpoint, "where to mount the FUSE view (default DATA-DIR/mnt)")
	fs.StringVar(&c.Name, "name", c.Name, "plant name in classads and bids (default: HOST-DATADIR)")
	fs.StringVar(&c.Advertise, "advertise", c.Advertise, "HOST:PORT the shop reaches this plant at, registered in etcd (default: --listen; set it when listening on 0.0.0.0)")
	c.Etcd.AddFlags(fs, "etcd endpoints: register there and bid in the shop's auctions")
	fs.Uint64Var(&c.GuestMemoryMiB, "guest-memory-mib", c.GuestMemoryMiB, "memory guests may use in all (0: 80% of RAM)")
	fs.DurationVar(&c.AgentTimeout, "agent-timeout", c.AgentTimeout, "how long a clone's guest agent may take to answer before the creation fails (0: 2m)")
	fs.DurationVar(&c.GuestTimeout, "guest-timeout", plant.DefaultGuestTimeout, "how long a cold boot of a stock image may take until its guest is configured (qemu-ga answers, cloud-init done)")
	fs.StringVar(&c.MemoryRestore, "memory-restore", c.MemoryRestore, "how clones of images with a RAM file get guest memory: lazy (pages on first touch, the rest hydrated in the background), eager (all before the guest runs) or auto (lazy, prefetching the image's working-set profile; an image without one streams its whole RAM file from the restore on while the guest runs and records one)")
	fs.DurationVar(&c.HydrateAfter, "hydrate-after", c.HydrateAfter, "how long after a lazy clone is ready the plant starts fetching the rest of its RAM and disk in the background (0: 1s)")
	services.SizeVar(fs, &c.MemoryReadAhead, "memory-read-ahead", "what a lazily restored guest's page fault reads around the page (the kernel's read-ahead on MOUNTPOINT-mem, the view of RAM files)")
	fs.StringVar(&c.DataServer, "dataserver", c.DataServer, "data server of task stage-in/out (requests bring task credentials for it; empty: no staging)")
	services.AddTokensFlag(fs, &c.TokensFile)
	services.AddServiceTokenFlag(fs, &c.ServiceTokenFile, "to the upstream and to other plants (live migration)")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", c.DrainTimeout, "on SIGTERM/SIGINT, with --etcd: how long the plant drains (takes no new VMs while the shops live-migrate its VMs to other plants) before it stops the VMs left, which are then listed lost (0: stop at once)")
	c.Proxy.AddFlags(fs)
	c.Network.AddFlags(fs)
}

// DefaultCacheProxyConfig is the cache proxy's defaults, the ones its flags
// show.
func DefaultCacheProxyConfig() CacheProxyConfig {
	return CacheProxyConfig{
		Server:   services.Options{Name: "cacheproxy", Listen: "127.0.0.1:7071", MetricsListen: "127.0.0.1:9071"},
		Upstream: "127.0.0.1:7070",
		DataDir:  "/var/lib/vmgrid/cacheproxy",
		Proxy:    gvfs.DefaultConfig(),
	}
}

// AddFlags registers the cache proxy's flags with c's values as defaults.
func (c *CacheProxyConfig) AddFlags(fs *pflag.FlagSet) {
	c.Server.AddFlags(fs)
	addUpstreamFlags(fs, &c.Upstream, &c.Compress)
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "directory for the caches")
	services.AddTokensFlag(fs, &c.TokensFile)
	services.AddServiceTokenFlag(fs, &c.ServiceTokenFile, "to the upstream")
	c.Proxy.AddCacheProxyFlags(fs)
}

func addUpstreamFlags(fs *pflag.FlagSet, upstream *string, compress *bool) {
	fs.StringVar(upstream, "upstream", *upstream, "image server or cache proxy to read from")
	fs.BoolVar(compress, "compress", *compress, "ask the upstream for zstd-compressed blocks (for slow links)")
}
