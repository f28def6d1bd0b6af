package blockproto

import "crypto/sha256"

const (
	// ZeroGranule is the granularity of zero maps: a page, the unit QEMU and
	// the kernel read and the unit a file system can leave as a hole.
	ZeroGranule = 4096
	// DefaultBlockSize is the ReadBlocks and digest granularity when a
	// publisher does not choose one.
	DefaultBlockSize = 64 << 10
	MinBlockSize     = 4 << 10
	MaxBlockSize     = 1 << 20
	// ChunkSize is the uncompressed size of one FetchFile zstd frame.
	ChunkSize = 1 << 20
	// DigestSize is the size of one block digest (SHA-256).
	DigestSize = sha256.Size
)

// ZeroMapLen is the length in bytes of the zero map of a file of size bytes.
func ZeroMapLen(size uint64) int {
	granules := (size + ZeroGranule - 1) / ZeroGranule
	return int((granules + 7) / 8)
}

// IsZeroRange reports whether every granule overlapping [off, off+n) is
// marked zero in zm.
func IsZeroRange(zm []byte, off, n uint64) bool {
	if n == 0 {
		return true
	}
	first := off / ZeroGranule
	last := (off + n - 1) / ZeroGranule
	for g := first; g <= last; g++ {
		if int(g/8) >= len(zm) || zm[g/8]&(1<<(g%8)) == 0 {
			return false
		}
	}
	return true
}

// IsZero reports whether b is all zero bytes.
func IsZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

var zeroPage [MaxBlockSize]byte

// ZeroDigest is the SHA-256 of n zero bytes (n ≤ MaxBlockSize).
func ZeroDigest(n int) [DigestSize]byte { return sha256.Sum256(zeroPage[:n]) }
