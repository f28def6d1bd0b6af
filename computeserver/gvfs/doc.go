// Package gvfs is the core of the compute server's data plane: the
// client-side proxy of GVFS (Zhao, Zhang, Figueiredo, HPDC 2004, §3.2)
// rebuilt on gRPC. It knows nothing of FUSE: a Proxy opens image files
// (File: a read-only golden file or a read-write persistent disk behind one
// interface) and answers ReadAt, WriteAt and Sync from the nearest place
// that has the bytes; views register with it (View) to be told what content
// to drop.
//
// # Packages
//
//	gvfs             the core: Proxy, File, caches, write-back, upstream
//	gvfs/fuseview    the FUSE view MOUNT/IMAGE/FILE over the core (an
//	                 unmodified VM monitor opens these files)
//	gvfs/cacheproxy  ImageService served from a Proxy (a cache proxy)
//	blockcache       the disk block cache under the core
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
// # Upstream away
//
// A read whose upstream is unavailable waits and asks again with backoff
// for Config.UpstreamRetry (2 minutes by default) before it fails, as a
// hard NFS mount does, so a guest rides out an image server's restart. So
// does the first look at an image's manifest. The window counts from the
// start of the outage, shared by every read of the upstream: once it has
// passed, reads fail at once until the upstream answers again, and
// Upstream.Unreachable tells a plant why its guest saw I/O errors.
//
// # Cascade
//
// Package cacheproxy serves the same ImageService API from a Proxy, so a cache
// proxy in a LAN can stand between compute servers and a distant image
// server, and proxies chain (GVFS's second-level cache). Publishing,
// write-back and deletion are forwarded.
//
// # Errors
//
// Errors wrap services/errdefs sentinels: NotFound for unknown images and
// files, FailedPrecondition for writes to golden files, ResourceExhausted
// for writes past the end of a disk, Unavailable when the upstream stays
// away. The FUSE view turns them into errno values.
package gvfs
