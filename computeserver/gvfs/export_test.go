package gvfs

// Test hooks for the external tests of this package.

// BlockCache is the proxy's view of the disk block cache.
type BlockCache = blockCache

// BlockCacheOf returns the block cache of p.
func BlockCacheOf(p *Proxy) BlockCache { return p.cache }

// SetBlockCache replaces the block cache of p (before any read).
func SetBlockCache(p *Proxy, c BlockCache) { p.cache = c }
