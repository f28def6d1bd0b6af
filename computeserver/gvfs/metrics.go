package gvfs

import (
	"github.com/prometheus/client_golang/prometheus"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

var flushBuckets = prometheus.ExponentialBuckets(0.001, 4, 10)

func newFlushHistogram() prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "vmgrid", Subsystem: "cache", Name: "flush_seconds",
		Help: "Latency of write-back flushes of a persistent disk.", Buckets: flushBuckets,
	})
}

// RegisterMetrics exports the proxy's counters: hits, misses, zero blocks
// served, collapsed misses, bytes fetched per upstream, dirty bytes, flush
// latency.
func (p *Proxy) RegisterMetrics(reg prometheus.Registerer) error {
	up := prometheus.Labels{"upstream": p.up.Addr}
	counter := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "vmgrid", Subsystem: "cache", Name: name, Help: help, ConstLabels: up}, f)
	}
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "vmgrid", Subsystem: "cache", Name: name, Help: help, ConstLabels: up}, f)
	}
	s := &p.stats
	cs := []prometheus.Collector{
		counter("hits_total", "Block reads answered by the disk block cache.", func() float64 { return float64(s.Hits.Load()) }),
		counter("misses_total", "Block reads the disk block cache could not answer.", func() float64 { return float64(s.Misses.Load()) }),
		counter("zero_blocks_total", "Block reads answered from zero-block meta-data, without I/O.", func() float64 { return float64(s.ZeroBlocks.Load()) }),
		counter("collapsed_total", "Misses that joined an upstream fetch already in flight.", func() float64 { return float64(s.Collapsed.Load()) }),
		counter("prefetched_blocks_total", "Blocks fetched ahead of a sequential reader or from a boot profile.", func() float64 { return float64(s.Prefetched.Load()) }),
		counter("fetched_blocks_total", "Blocks received from the upstream.", func() float64 { return float64(s.FetchedBlocks.Load()) }),
		counter("fetched_bytes_total", "Block payload bytes received from the upstream.", func() float64 { return float64(s.FetchedBytes.Load()) }),
		counter("file_bytes_total", "Bytes received through the whole-file channel.", func() float64 { return float64(p.files.Received()) }),
		counter("flushed_blocks_total", "Dirty blocks written back to the image server.", func() float64 { return float64(s.FlushedBlocks.Load()) }),
		gauge("dirty_bytes", "Bytes of dirty blocks not yet written back.", func() float64 {
			_, _, dirty := p.cache.Usage()
			return float64(dirty) * float64(p.cache.BlockSize())
		}),
		gauge("cached_blocks", "Frames of the disk block cache holding a block.", func() float64 {
			cached, _, _ := p.cache.Usage()
			return float64(cached)
		}),
		counter("hydrated_blocks_total", "Blocks fetched in the background so a lazily restored VM no longer needs the upstream.", func() float64 { return float64(s.Hydrated.Load()) }),
		counter("profile_fetched_blocks_total", "Blocks fetched from working-set profiles.", func() float64 { return float64(s.ProfileFetched.Load()) }),
		counter("profile_used_blocks_total", "Profile-fetched blocks a clone then read (hit rate: used ÷ fetched).", func() float64 { return float64(s.ProfileUsed.Load()) }),
		counter("profile_missed_blocks_total", "Blocks clones read that their profile did not hold.", func() float64 { return float64(s.ProfileMissed.Load()) }),
		p.flushHist,
	}
	for c := Class(0); c < numClasses; c++ {
		cs = append(cs, prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "cache", Name: "upstream_requests_total",
			Help:        "ReadBlocks requests sent upstream, by class (demand reads have a connection of their own).",
			ConstLabels: prometheus.Labels{"upstream": p.up.Addr, "class": c.String()},
		}, func() float64 { return float64(s.ClassRequests[c].Load()) }))
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// StatsProto reports the counters as the CacheService answers them.
func (p *Proxy) StatsProto() *computev1.GetCacheStatsResponse {
	s := &p.stats
	cached, capacity, dirty := p.cache.Usage()
	bs := uint64(p.cache.BlockSize())
	return &computev1.GetCacheStatsResponse{
		Hits:           s.Hits.Load(),
		Misses:         s.Misses.Load(),
		ZeroBlocks:     s.ZeroBlocks.Load(),
		Collapsed:      s.Collapsed.Load(),
		FetchedBlocks:  s.FetchedBlocks.Load(),
		FetchedBytes:   s.FetchedBytes.Load(),
		FileCacheBytes: p.files.Received(),
		DirtyBlocks:    dirty,
		DirtyBytes:     dirty * bs,
		CachedBlocks:   cached,
		CapacityBlocks: capacity,
		BlockSize:      uint32(bs),
		Upstream:       p.up.Addr,
	}
}
