// Package blockcache is the compute server's disk block cache: the
// proxy-managed, set-associative, write-back cache of GVFS §3.2.1, kept on
// local disk so that it survives restarts and crashes.
//
// It is a local library. The FUSE view and the GVFS proxy call it: on a read
// they try Get, and on a miss fetch the block upstream and Put (or
// PutVerified) it; writes to persistent disks and redo logs go to Write and
// stay dirty until the middleware-driven flush reads them with ReadDirty,
// writes them back upstream and calls MarkClean.
//
//	c, err := blockcache.Open(blockcache.Config{Dir: dir, Capacity: 8 << 30, Ways: 16, BlockSize: 64 << 10})
//	n, ok, err := c.Get(blockcache.Key{File: "golden/disk.raw", Block: 42}, buf)
//
// A block is identified by a Key: an opaque file id chosen by the caller
// (an image file name or a content digest) and a block index. Block b of a
// file covers bytes [b×BlockSize, (b+1)×BlockSize); the last block of a file
// may be shorter.
//
// # Geometry
//
// The cache has Sets sets of Ways frames of BlockSize bytes each (Capacity
// = Sets × Ways × BlockSize). A block lives in set
//
//	(H(file) + block) mod Sets
//
// where H is the first 64 bits of SHA-256 of the file id, so consecutive
// blocks of a file fall in consecutive sets (and, the sets of a bank being
// contiguous, in nearby places of one bank file) and two blocks of one file
// share a set only when the file spans more than Sets blocks. Within
// a set, replacement is least recently used among clean blocks. Dirty blocks
// are never evicted: when every way of a set is dirty, Put and Write store
// nothing and return an error wrapping ErrSetFull (errdefs.ErrResourceExhausted).
//
// # On-disk format
//
// Config.Dir holds:
//
//	meta.json      the geometry; written last at creation (rename), so a
//	               directory without it holds a half-created cache
//	bank-NNNN      frame data: sparse files, SetsPerBank sets each; set s
//	               has Ways+1 frames, frame w at ((s mod SetsPerBank)×(Ways+1)+w)×BlockSize
//	               in bank s/SetsPerBank
//	tags           one 64-byte tag per frame, frame f (= s×(Ways+1)+w) at f×64
//	names          journal of file ids of dirty blocks (tags hold only hashes)
//	LOCK           flock(2)ed while a process has the cache open
//
// A tag holds: valid and dirty flags, the block's length, block index,
// 128-bit file hash (the first half of SHA-256 of the file id), write
// sequence number, LRU stamp, CRC-32C of the frame's data, a magic and a
// CRC-32C of the tag itself. A record that fails its own checksum, such as
// the zeros of a never-written region, is a free frame. The 128-bit hash is
// what identifies the file: two different file ids would need a SHA-256
// prefix collision to see each other's data. The name journal keeps the
// full ids of files with dirty blocks so that DirtyFiles works after a
// restart; it is compacted when the cache is opened.
//
// Every set has one frame more than its ways. The spare lets a new version
// of a dirty block be written next to the old one, and replace it only when
// it is durable, even when every way is dirty: disk use is (Ways+1)/Ways of
// Capacity (6 % for 16 ways; the banks are sparse, so unused frames take no
// space). A frame costs 64 bytes of tag on disk and about 76 bytes of
// memory: 8 GiB of 64 KiB blocks in 16 ways is 8.5 MiB of tags and 10 MiB
// of memory (and reopens in about 10 ms); 8 GiB of 4 KiB blocks is 136 MiB
// of tags and 161 MiB of memory.
//
// Open reopens a cache with the same geometry warm: it reads all tags, so
// every block still hits and every dirty block is still dirty. LRU stamps
// are kept in memory and written to the tags by Close (and whenever a tag
// is written anyway), so after a crash eviction order is approximate. A
// cache with another geometry is recreated, with a warning in the log; if it
// holds dirty blocks Open refuses (errdefs.ErrFailedPrecondition) rather
// than drop them: open it with its old geometry and flush first.
//
// # Crash safety
//
// The contract, for a crash of the process (kill -9) and, unless
// Config.UnsafeNoFsync is set, of the machine:
//
//   - Get never returns data other than the last data stored under its key
//     (after a machine crash: but for a 2⁻³² chance that a frame torn by
//     the crash has the CRC-32C of the data it should hold).
//   - A Write that returned survives: the block is present and dirty after
//     Open, with that data or that of a later Write.
//   - A clean block may be lost (it reads as a miss) but never wrong.
//
// How:
//
//   - Every Get checks the frame's data against the CRC-32C in its tag. A
//     mismatch in a clean frame (a torn or reordered write before a crash,
//     damage on disk) drops it and reports a miss; in a dirty frame, which
//     the write order below rules out short of damage, it returns an error
//     wrapping errdefs.ErrDataLoss. The check runs at about 20 GB/s
//     (3 µs per 64 KiB block, a third of a warm Get).
//   - Before a frame is reused its old tag is overwritten with an invalid
//     one, so the old tag never describes the new data.
//   - Put writes data, then tag, without fsync: cheap, and a machine crash
//     that tears it is caught by the checksum.
//   - Write puts the new version in a free frame: name journal (first
//     write of a file id, fdatasync), data, fdatasync of the bank, tag,
//     fdatasync of the tags; only then the old version's tag is
//     invalidated. A crash in between leaves two versions; Open keeps the
//     one with the higher write sequence number. The cost is two
//     fdatasyncs per Write: on this project's VMs (ext4 on virtio) a 4 KiB
//     Write takes 0.3 ms with them and 6 µs without (BenchmarkWrite).
//     Writers that arrive while an fdatasync of a file runs share the next
//     one (group commit), so many concurrent writers need fewer syncs than
//     writes.
//   - MarkClean writes the clean tag and fdatasyncs it before the frame may
//     be evicted, so a dirty tag cannot outlive its data being overwritten.
//   - Invalidate, Drop and DropClean fdatasync the tags, so that a dropped
//     block stays dropped.
//
// Flushing is the caller's: ReadDirty returns a dirty block with its write
// sequence number; after writing it back, MarkClean(key, seq) cleans the
// block only if it was not rewritten meanwhile (else ErrStale: flush again).
//
// # Concurrency
//
// All methods are safe for concurrent use, except Close. Each set has its
// own mutex, held to look up and update tags in memory and, when a frame
// is freed or cleaned, to write its 64-byte tag; never during data I/O or
// fsync. A reader notes the frame's generation under the lock,
// reads the data with pread, and checks the generation again: a writer bumps
// it when it reserves the frame, so a read that raced with a reuse is
// retried, never returned. A fill marks its frame as filling: readers skip
// it, and a second Write of the same block waits for the first, so versions
// are ordered by sequence number. Data moves with pread and pwrite
// (ReadAt/WriteAt) on shared files. Open takes an exclusive flock on the
// directory: one process per cache.
package blockcache
