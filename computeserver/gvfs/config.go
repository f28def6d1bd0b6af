package gvfs

import (
	"time"

	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/blockcache"
	"github.com/vmgrid/vmgrid/services"
)

// ReadAheadKB is the kernel's read-ahead in front of a view: the FUSE view
// sets it on its mount's backing device (the kernel resets it to 128 on
// every mount), and the proxy takes a read within this window of the last
// one as sequential, because the kernel sends the reads of one stream
// several at a time and in any order.
const ReadAheadKB = 8192

// DiskRecheck is how long a persistent disk's manifest is used before the
// upstream is asked again (its generation tells whether another plant wrote
// it); views keep a disk's attributes as long.
const DiskRecheck = time.Second

// Config configures a Proxy. Zero fields take their value from
// DefaultConfig.
type Config struct {
	Upstream *Upstream
	// Dir holds the block cache, the file cache and per-disk state.
	Dir   string
	Cache CacheConfig
	// ReadAhead is the most a sequential reader is read ahead (negative
	// disables read-ahead).
	ReadAhead int
	// FlushIdle writes dirty disks back after this long without writes
	// (negative disables).
	FlushIdle time.Duration
	// GoldenRecheck is how long a golden image's manifest is used before
	// the upstream is asked again: an image never changes, but its name may
	// be deleted and published again with other files.
	GoldenRecheck time.Duration
	// UpstreamRetry is how long a read waits for an upstream that is away
	// (unavailable), asking again with backoff, before it fails with EIO,
	// as a hard NFS mount does: a guest survives an image server restart.
	// Negative: fail at once.
	UpstreamRetry time.Duration
	Logger        *zap.Logger
}

// CacheConfig is the geometry of the disk block cache.
type CacheConfig struct {
	Capacity  int64 // bytes
	Ways      int   // associativity
	BlockSize int   // frame size, 4 KiB..1 MiB
}

// DefaultCacheConfig is blockcache's default geometry.
func DefaultCacheConfig() CacheConfig {
	d := blockcache.DefaultConfig()
	return CacheConfig{Capacity: d.Capacity, Ways: d.Ways, BlockSize: d.BlockSize}
}

// DefaultConfig is a compute server's data plane unless told otherwise.
func DefaultConfig() Config {
	return Config{
		Cache:         DefaultCacheConfig(),
		ReadAhead:     32 << 20,
		FlushIdle:     30 * time.Second,
		GoldenRecheck: 5 * time.Second,
		UpstreamRetry: 2 * time.Minute,
	}
}

// withDefaults fills the zero fields of c from DefaultConfig.
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	c.Logger = services.LoggerOr(c.Logger)
	c.Cache = c.Cache.withDefaults()
	if c.ReadAhead == 0 {
		c.ReadAhead = d.ReadAhead
	}
	if c.FlushIdle == 0 {
		c.FlushIdle = d.FlushIdle
	}
	if c.GoldenRecheck <= 0 {
		c.GoldenRecheck = d.GoldenRecheck
	}
	if c.UpstreamRetry == 0 {
		c.UpstreamRetry = d.UpstreamRetry
	}
	return c
}

func (c CacheConfig) withDefaults() CacheConfig {
	d := DefaultCacheConfig()
	if c.Capacity == 0 {
		c.Capacity = d.Capacity
	}
	if c.Ways == 0 {
		c.Ways = d.Ways
	}
	if c.BlockSize == 0 {
		c.BlockSize = d.BlockSize
	}
	return c
}

// AddFlags registers the flags of a compute server's data plane
// (--read-ahead, --flush-idle, --upstream-retry and the cache flags) with
// c's values (DefaultConfig's, usually) as defaults.
func (c *Config) AddFlags(fs *pflag.FlagSet) {
	c.AddCacheProxyFlags(fs)
	fs.DurationVar(&c.FlushIdle, "flush-idle", c.FlushIdle, "write dirty disks back after this long without writes (negative: never on idle)")
}

// AddCacheProxyFlags registers the flags a cache proxy shares with a
// compute server (every flag of AddFlags but --flush-idle: a cache proxy
// holds no dirty disks).
func (c *Config) AddCacheProxyFlags(fs *pflag.FlagSet) {
	fs.IntVar(&c.ReadAhead, "read-ahead", c.ReadAhead, "bytes to fetch ahead of a sequential reader")
	fs.DurationVar(&c.UpstreamRetry, "upstream-retry", c.UpstreamRetry, "how long reads wait for an upstream that is away before they fail (negative: fail at once)")
	c.Cache.AddFlags(fs)
}

// AddFlags registers --cache-size, --cache-ways and --cache-block-size with
// c's values as defaults.
func (c *CacheConfig) AddFlags(fs *pflag.FlagSet) {
	services.SizeVar(fs, &c.Capacity, "cache-size", "capacity of the disk block cache")
	fs.IntVar(&c.Ways, "cache-ways", c.Ways, "associativity of the disk block cache (frames per set)")
	services.SizeVar(fs, &c.BlockSize, "cache-block-size", "frame size of the disk block cache, a power of two from 4KiB to 1MiB")
}
