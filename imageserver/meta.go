package imageserver

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
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
		ZeroMap:   make([]byte, blockproto.ZeroMapLen(size)),
		Digests:   make([]byte, 0, nblocks*blockproto.DigestSize),
	}
	sc := &scanner{f: f, fd: int(f.Fd()), size: size, punch: punch}
	if err := sc.nextRegion(0); err != nil {
		return nil, fmt.Errorf("seek data: %w", err)
	}
	whole := sha256.New()
	buf := make([]byte, bs)
	fullZero := blockproto.ZeroDigest(int(bs)) // the same for every whole zero block
	for b := uint64(0); b < nblocks; b++ {
		off := b * bs
		blk := buf[:min(bs, size-off)]
		hadData, err := sc.fill(blk, off)
		if err != nil {
			return nil, err
		}
		whole.Write(blk)
		allZero, err := sc.mapZeros(s, blk, off, hadData)
		if err != nil {
			return nil, err
		}
		var d [blockproto.DigestSize]byte
		switch {
		case allZero && uint64(len(blk)) == bs:
			d = fullZero
		case allZero:
			d = blockproto.ZeroDigest(len(blk))
		default:
			d = sha256.Sum256(blk)
		}
		s.Digests = append(s.Digests, d[:]...)
	}
	if err := sc.flushPunch(); err != nil {
		return nil, fmt.Errorf("punch hole: %w", err)
	}
	s.SHA256 = whole.Sum(nil)
	return s, nil
}

// scanner walks a sparse file's data regions and collects the zero granules
// stored as data into runs to punch.
type scanner struct {
	f     *os.File
	fd    int
	size  uint64
	punch bool
	// dataEnd is the end of the data region that contains the current
	// offset (or the start of the next one when in a hole).
	dataStart, dataEnd   uint64
	punchStart, punchLen uint64
}

func (sc *scanner) nextRegion(off uint64) error {
	d, err := unix.Seek(sc.fd, int64(off), unix.SEEK_DATA)
	if err != nil {
		if errors.Is(err, unix.ENXIO) { // no data after off
			sc.dataStart, sc.dataEnd = sc.size, sc.size
			return nil
		}
		return err
	}
	h, err := unix.Seek(sc.fd, d, unix.SEEK_HOLE)
	if err != nil {
		return err
	}
	sc.dataStart, sc.dataEnd = uint64(d), uint64(h)
	return nil
}

// fill reads the block at off into blk: holes are zero, data regions are
// read. hadData reports whether any of it was stored as data.
func (sc *scanner) fill(blk []byte, off uint64) (hadData bool, err error) {
	clear(blk)
	n := uint64(len(blk))
	for pos := off; pos < off+n; {
		if pos >= sc.dataEnd {
			if err := sc.nextRegion(pos); err != nil {
				return false, fmt.Errorf("seek data: %w", err)
			}
		}
		if pos < sc.dataStart {
			pos = min(sc.dataStart, off+n)
			continue
		}
		end := min(sc.dataEnd, off+n)
		if _, err := sc.f.ReadAt(blk[pos-off:end-off], int64(pos)); err != nil && !errors.Is(err, io.EOF) {
			return false, err
		}
		hadData = true
		pos = end
	}
	return hadData, nil
}

// mapZeros marks the zero granules of the block at off in s.ZeroMap, counts
// the others, and queues zero granules stored as data for punching. It
// reports whether the whole block is zero.
func (sc *scanner) mapZeros(s *FileScan, blk []byte, off uint64, hadData bool) (allZero bool, err error) {
	allZero = true
	n := uint64(len(blk))
	for g := uint64(0); g < n; g += blockproto.ZeroGranule {
		gn := min(blockproto.ZeroGranule, n-g)
		gi := (off + g) / blockproto.ZeroGranule
		if hadData && !blockproto.IsZero(blk[g:g+gn]) {
			allZero = false
			s.NonZero += gn
			continue
		}
		s.ZeroMap[gi/8] |= 1 << (gi % 8) // a block of holes is zero unscanned
		if hadData {
			if err := sc.addPunch(off+g, gn); err != nil {
				return false, fmt.Errorf("punch hole: %w", err)
			}
		}
	}
	return allZero, nil
}

// addPunch extends the pending run of zero granules, or punches it and
// starts a new one.
func (sc *scanner) addPunch(off, n uint64) error {
	if sc.punchLen > 0 && sc.punchStart+sc.punchLen == off {
		sc.punchLen += n
		return nil
	}
	if err := sc.flushPunch(); err != nil {
		return err
	}
	sc.punchStart, sc.punchLen = off, n
	return nil
}

func (sc *scanner) flushPunch() error {
	if sc.punchLen == 0 || !sc.punch {
		sc.punchLen = 0
		return nil
	}
	err := unix.Fallocate(sc.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(sc.punchStart), int64(sc.punchLen))
	sc.punchLen = 0
	return err
}
