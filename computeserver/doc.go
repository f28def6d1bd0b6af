// Package computeserver is the vmgrid compute server role: one process that
// is both a node of the data plane and a plant.
//
// The data plane (package gvfs) mounts a FUSE view of every image the
// upstream holds, served from a disk block cache and a file cache, with
// write-back of persistent disks; CacheService flushes, inspects and empties
// the caches. The plant (package plant, the production line) clones golden
// images into guests on that view and configures them; PlantService is its
// API, and with etcd configured it registers in the shop's registry and bids
// in its auctions.
//
// Start assembles the role and returns a Server (Addr, Serve, Close), as
// every vmgrid role's Start does; StartCacheProxyServer does the same for
// the cache proxy (the image read API over the same caches, no FUSE, no
// plant).
package computeserver
