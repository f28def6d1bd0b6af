// Package computeserver is a vmgrid plant: the compute server. Today it runs
// the data plane (package gvfs): a FUSE view of every image the upstream
// holds, served from a disk block cache and a file cache, with write-back of
// persistent disks, and the CacheService to flush, inspect and empty the
// caches.
package computeserver
