// Package gvfs is the compute server's data plane: the client-side proxy of
// GVFS (Zhao, Zhang, Figueiredo, HPDC 2004, §3.2) rebuilt on FUSE and gRPC.
// An unmodified VM monitor opens MOUNT/IMAGE/FILE; every read the kernel
// page cache misses comes to the Proxy, which answers it from the nearest
// place that has the bytes.
//
// # Read path
//
//	kernel page cache (KEEP_CACHE for golden files, 8 MiB read-ahead, 1 MiB reads)
//	  → zero-block meta-data (zero granules are answered locally, never fetched)
//	  → disk block cache (package blockcache; set-associative, tags on disk)
//	  → file cache (WHOLE_FILE policy: one zstd FetchFile stream per file)
//	  → upstream: an image server or a cache proxy, over one pipelined
//	    ReadBlocks stream
//
// Concurrent misses for one block join a single upstream fetch; misses of
// consecutive blocks go out as one request; a sequential reader is read ahead
// with a window that doubles up to Config.ReadAhead, so a long read costs
// bytes ÷ bandwidth, not round trips. Every block filled into the cache is
// checked against its SHA-256 from the manifest. Golden files are cached
// under their content (the file's SHA-256), so equal files of different
// images share cache frames and a re-published name never serves old data.
//
// # Whole files
//
// Files whose policy is WHOLE_FILE (memory state, kernels, configs) come
// through the compressed channel into the file cache. A read waits only for
// its own range; the finished file is verified against its SHA-256 and kept
// across restarts.
//
// # Write-back
//
// Persistent disks are read-write. A write lands in the block cache as a
// dirty block, durably, before it returns: a kill -9 loses nothing. Dirty
// blocks are written back in one WriteBlocks batch on Flush (the
// CacheService RPC, `vmgrid cache flush`, SIGUSR1), after Config.FlushIdle
// without writes, and at Close; a compute server flushes what a previous run
// left dirty when it starts. Write-through can be chosen per disk. A flush
// is idempotent. The image server's generation of a disk tells the proxy
// when another plant wrote it, and its clean cached blocks are dropped
// (session consistency, as the paper's middleware-driven model).
//
// # Cascade
//
// ProxyService serves the same ImageService API from a Proxy, so a cache
// proxy in a LAN can stand between compute servers and a distant image
// server, and proxies chain (GVFS's second-level cache). Publishing,
// write-back and deletion are forwarded.
//
// # Errors
//
// FUSE calls return errno values: ENOENT for unknown images and files, EROFS
// for writes to golden files, EPERM for size changes, ENOSPC for writes past
// the end of a disk, EIO when the upstream fails.
package gvfs
