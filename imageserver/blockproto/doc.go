// Package blockproto is the block protocol that every tier of the GVFS proxy
// chain speaks (GVFS §3): the image server over its store and a cache proxy
// over its caches answer ReadBlocks and FetchFile the same way, and clients
// check what they get the same way.
//
// # Meta-data
//
// A file is read in blocks of a power-of-two size between MinBlockSize and
// MaxBlockSize. Its meta-data, computed once when it is published, carries
// a zero map (one bit per ZeroGranule bytes, set when the granule is all
// zero: zero blocks are answered from the map and never cross the wire,
// GVFS §3.2.2) and one SHA-256 per block (DigestSize bytes each), against
// which every block read is verified (VerifyBlock), at every tier.
//
// # Serving
//
// ServeReadBlocks answers a bidirectional ReadBlocks stream: requests are
// pipelined, blocks are read by several workers and sent by one, and a
// request for a missing file or past its end is answered in-band so the
// stream goes on. ServeFetchFile answers the whole-file channel: chunks of
// ChunkSize bytes, each one zstd frame, in order. A tier provides its files
// through SourceOpener and BlockSource (and FrameSource when it holds frames
// compressed already); the streaming logic lives here once.
package blockproto
