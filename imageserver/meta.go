package imageserver

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

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

// FileScan is the meta-data of one file, computed by ScanFile.
type FileScan struct {
	Size      uint64
	BlockSize uint32
	// ZeroMap has one bit per ZeroGranule bytes (LSB first); set = all zero.
	ZeroMap []byte
	// Digests holds one SHA-256 per block, concatenated.
	Digests []byte
	SHA256  []byte
	// NonZero counts bytes in granules that are not all zero.
	NonZero uint64
}

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

// ScanFile computes the meta-data of f and, when punch is set, turns every
// zero granule that is stored as data into a hole, so zero blocks cost no
// disk. Holes are found with SEEK_DATA/SEEK_HOLE and never read.
func ScanFile(f *os.File, blockSize uint32, punch bool) (*FileScan, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := uint64(st.Size())
	bs := uint64(blockSize)
	nblocks := (size + bs - 1) / bs
	s := &FileScan{
		Size:      size,
		BlockSize: blockSize,
		ZeroMap:   make([]byte, ZeroMapLen(size)),
		Digests:   make([]byte, 0, nblocks*DigestSize),
	}
	whole := sha256.New()
	buf := make([]byte, bs)
	fd := int(f.Fd())
	// dataEnd is the end of the data region that contains the current offset
	// (or the start of the next one when in a hole).
	var dataStart, dataEnd uint64
	nextRegion := func(off uint64) error {
		d, err := unix.Seek(fd, int64(off), unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) { // no data after off
				dataStart, dataEnd = size, size
				return nil
			}
			return err
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		dataStart, dataEnd = uint64(d), uint64(h)
		return nil
	}
	if err := nextRegion(0); err != nil {
		return nil, fmt.Errorf("seek data: %w", err)
	}
	fullZero := ZeroDigest(int(bs)) // the same for every whole zero block
	var punchStart, punchLen uint64
	flushPunch := func() error {
		if punchLen == 0 || !punch {
			punchLen = 0
			return nil
		}
		err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(punchStart), int64(punchLen))
		punchLen = 0
		return err
	}
	for b := uint64(0); b < nblocks; b++ {
		off := b * bs
		n := min(bs, size-off)
		blk := buf[:n]
		// Fill the block: holes are zero, data regions are read.
		clear(blk)
		hadData := false
		for pos := off; pos < off+n; {
			if pos >= dataEnd {
				if err := nextRegion(pos); err != nil {
					return nil, fmt.Errorf("seek data: %w", err)
				}
			}
			if pos < dataStart {
				pos = min(dataStart, off+n)
				continue
			}
			end := min(dataEnd, off+n)
			if _, err := f.ReadAt(blk[pos-off:end-off], int64(pos)); err != nil && !errors.Is(err, io.EOF) {
				return nil, err
			}
			hadData = true
			pos = end
		}
		whole.Write(blk)
		allZero := true
		for g := uint64(0); g < n; g += ZeroGranule {
			gn := min(ZeroGranule, n-g)
			gi := (off + g) / ZeroGranule
			if !hadData || IsZero(blk[g:g+gn]) { // a block of holes is zero unscanned
				s.ZeroMap[gi/8] |= 1 << (gi % 8)
				if hadData {
					if punchLen > 0 && punchStart+punchLen == off+g {
						punchLen += gn
					} else {
						if err := flushPunch(); err != nil {
							return nil, fmt.Errorf("punch hole: %w", err)
						}
						punchStart, punchLen = off+g, gn
					}
				}
			} else {
				allZero = false
				s.NonZero += gn
			}
		}
		var d [DigestSize]byte
		switch {
		case allZero && n == bs:
			d = fullZero
		case allZero:
			d = ZeroDigest(int(n))
		default:
			d = sha256.Sum256(blk)
		}
		s.Digests = append(s.Digests, d[:]...)
	}
	if err := flushPunch(); err != nil {
		return nil, fmt.Errorf("punch hole: %w", err)
	}
	s.SHA256 = whole.Sum(nil)
	return s, nil
}
