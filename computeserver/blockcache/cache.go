package blockcache

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Errors returned by the cache. Each wraps an errdefs sentinel so that the
// upper layers map it to a gRPC code without knowing this package.
var (
	// ErrSetFull: every way of the block's set holds dirty data (or data
	// being written), so nothing could be evicted; nothing was stored.
	// Flush some of the file's dirty blocks and retry.
	ErrSetFull = fmt.Errorf("blockcache: every way of the set is dirty: %w", errdefs.ErrResourceExhausted)
	// ErrStale: MarkClean was given the sequence number of a version that
	// has since been rewritten; the block stays dirty.
	ErrStale = fmt.Errorf("blockcache: block was rewritten since it was read for flushing: %w", errdefs.ErrAborted)
	// ErrDirty: the block holds data not yet written back, so it cannot be
	// dropped.
	ErrDirty = fmt.Errorf("blockcache: block is dirty: %w", errdefs.ErrFailedPrecondition)
	// ErrClosed: the cache was closed.
	ErrClosed = fmt.Errorf("blockcache: closed: %w", errdefs.ErrFailedPrecondition)
)

// Key names a block: block Block (of BlockSize bytes) of the file File.
// File is an opaque, stable id chosen by the caller, such as "image/file" or
// a content digest; it is at most 4096 bytes.
type Key struct {
	File  string
	Block uint64
}

// Cache is a disk block cache. All its methods are safe for concurrent use,
// except Close, which must not run concurrently with other calls.
type Cache struct {
	log    *zap.Logger
	dir    string
	geo    geometry
	bs     int
	ways   int
	stride uint64
	noSync bool

	sets   []set
	frames []frame // set s owns frames [s*stride, (s+1)*stride)

	banks    []*os.File
	bankSync []*syncer
	tags     *os.File
	tagSync  *syncer
	names    *nameTable
	lock     *os.File

	seq    atomic.Uint64 // last write sequence number handed out
	closed atomic.Bool

	dirtyMu    sync.Mutex
	dirty      map[string]map[uint64]uint32 // file -> block -> length
	dirtyCount int
	dirtyBytes int64

	valid atomic.Int64
	st    counters
}

type set struct {
	mu    sync.Mutex
	cond  *sync.Cond // made on first wait
	clock uint64     // LRU clock of this set
	_     [40]byte   // keep sets on separate cache lines
}

const (
	stateFree uint8 = iota
	stateFilling
	stateValid
)

// frame is the in-memory copy of a frame's tag plus its run-time state. All
// fields but gen are guarded by the lock of the frame's set.
type frame struct {
	// gen changes whenever the frame is reserved for new content. Readers
	// copy the data without the lock and check gen afterwards: if it is
	// unchanged, no writer touched the frame while they read.
	gen    atomic.Uint64
	fh     fileHash
	block  uint64
	seq    uint64
	lru    uint64
	disk   uint64 // LRU stamp in the on-disk tag
	length uint32
	crc    uint32
	state  uint8
	dirty  bool // valid: dirty; filling: the fill is a Write
	// onDisk: the on-disk tag may be a valid record, so it must be
	// overwritten before the frame's data is.
	onDisk bool
	// cancelled: a clean fill in progress was dropped by Invalidate or Drop.
	cancelled bool
	// holds > 0 keeps a clean frame from being evicted until its clean tag
	// is on stable storage (see MarkClean).
	holds uint8
}

type counters struct {
	hits, misses                  atomic.Uint64
	_                             [48]byte
	fills, writes, evictions      atomic.Uint64
	setFull, corrupt, cleaned     atomic.Uint64
	staleCleans, dropped, retries atomic.Uint64
}

// Stats is a snapshot of the cache's counters and contents.
type Stats struct {
	Hits, Misses uint64 // Get results
	Fills        uint64 // blocks stored by Put and PutVerified
	Writes       uint64 // blocks stored dirty by Write
	Evictions    uint64 // clean blocks evicted to make room
	SetFull      uint64 // Put or Write refused with ErrSetFull
	Corrupt      uint64 // frames whose data failed its checksum
	Cleaned      uint64 // blocks made clean by MarkClean
	StaleCleans  uint64 // MarkClean refused with ErrStale
	Dropped      uint64 // clean blocks dropped by Invalidate and Drop

	ValidBlocks int64 // blocks held, clean or dirty
	DirtyBlocks int   // blocks not yet written back
	DirtyBytes  int64

	Capacity  int64 // bytes: Sets × Ways × BlockSize
	BlockSize int
	Ways      int
	Sets      uint64
	Banks     int
}

// BlockSize returns the size of a block: block b of a file covers bytes
// [b×BlockSize, (b+1)×BlockSize).
func (c *Cache) BlockSize() int { return c.bs }

// Stats returns a snapshot of the counters.
func (c *Cache) Stats() Stats {
	c.dirtyMu.Lock()
	dn, db := c.dirtyCount, c.dirtyBytes
	c.dirtyMu.Unlock()
	return Stats{
		Hits:        c.st.hits.Load(),
		Misses:      c.st.misses.Load(),
		Fills:       c.st.fills.Load(),
		Writes:      c.st.writes.Load(),
		Evictions:   c.st.evictions.Load(),
		SetFull:     c.st.setFull.Load(),
		Corrupt:     c.st.corrupt.Load(),
		Cleaned:     c.st.cleaned.Load(),
		StaleCleans: c.st.staleCleans.Load(),
		Dropped:     c.st.dropped.Load(),
		ValidBlocks: c.valid.Load(),
		DirtyBlocks: dn,
		DirtyBytes:  db,
		Capacity:    int64(c.geo.Sets) * int64(c.ways) * int64(c.bs),
		BlockSize:   c.bs,
		Ways:        c.ways,
		Sets:        c.geo.Sets,
		Banks:       c.geo.Banks,
	}
}

// slot returns k's file hash and the index and the set k maps to.
func (c *Cache) slot(k Key) (fileHash, uint64, *set) {
	fh := hashFile(k.File)
	si := c.setIndex(fh, k.Block)
	return fh, si, &c.sets[si]
}

func (c *Cache) setIndex(fh fileHash, block uint64) uint64 {
	return (fh.base() + block) % c.geo.Sets
}

// frameLoc returns the bank file and offset of frame fi's data.
func (c *Cache) frameLoc(fi int) (*os.File, int64) {
	s := uint64(fi) / c.stride
	way := uint64(fi) % c.stride
	b := s / c.geo.SetsPerBank
	local := (s-b*c.geo.SetsPerBank)*c.stride + way
	return c.banks[b], int64(local) * int64(c.bs)
}

func (c *Cache) bankSyncer(fi int) *syncer {
	return c.bankSync[uint64(fi)/c.stride/c.geo.SetsPerBank]
}

func (c *Cache) writeTag(fi int, t *tag) error {
	var b [tagSize]byte
	t.encode(b[:])
	_, err := c.tags.WriteAt(b[:], int64(fi)*tagSize)
	return err
}

func (c *Cache) check(k Key) error {
	if c.closed.Load() {
		return ErrClosed
	}
	if k.File == "" || len(k.File) > maxFileID {
		return invalidf("file id of %d bytes (want 1..%d)", len(k.File), maxFileID)
	}
	return nil
}

// find returns the valid frame holding (fh, block) in set si, or -1.
func (c *Cache) find(si uint64, fh fileHash, block uint64) int {
	base := int(si * c.stride)
	for i := base; i < base+int(c.stride); i++ {
		f := &c.frames[i]
		if f.state == stateValid && f.block == block && f.fh == fh {
			return i
		}
	}
	return -1
}

type readResult uint8

const (
	readMiss readResult = iota
	readHit
	readRace // a writer reused the frame while we read; try again
)

// Get copies block k into dst and returns its length (BlockSize, or less for
// the last block of a file). ok is false on a miss. dst must hold the block.
// A frame whose data fails its checksum is dropped and reported as a miss if
// it was clean, and as an error wrapping errdefs.ErrDataLoss if it was dirty:
// Get never returns data other than what was stored under k.
func (c *Cache) Get(k Key, dst []byte) (n int, ok bool, err error) {
	if err := c.check(k); err != nil {
		return 0, false, err
	}
	n, _, _, ok, err = c.read(k, dst, false)
	switch {
	case err != nil:
	case ok:
		c.st.hits.Add(1)
	default:
		c.st.misses.Add(1)
	}
	return n, ok, err
}

// ReadDirty copies dirty block k into dst for flushing and returns its length
// and write sequence number; pass that number to MarkClean once the data is
// written back. It returns an error wrapping errdefs.ErrNotFound if k is not
// dirty.
func (c *Cache) ReadDirty(k Key, dst []byte) (n int, seq uint64, err error) {
	if err := c.check(k); err != nil {
		return 0, 0, err
	}
	n, seq, dirty, ok, err := c.read(k, dst, true)
	if err != nil {
		return 0, 0, err
	}
	if !ok || !dirty {
		return 0, 0, fmt.Errorf("blockcache: %s block %d is not dirty: %w", k.File, k.Block, errdefs.ErrNotFound)
	}
	return n, seq, nil
}

func (c *Cache) read(k Key, dst []byte, dirtyOnly bool) (n int, seq uint64, dirty, ok bool, err error) {
	fh, si, _ := c.slot(k)
	for range 8 {
		var res readResult
		n, seq, dirty, res, err = c.readOnce(k, fh, si, dst, dirtyOnly)
		if err != nil || res != readRace {
			return n, seq, dirty, res == readHit, err
		}
		c.st.retries.Add(1)
	}
	// Eight writers in a row reused the frame under us: the block is being
	// replaced so fast that a miss is an honest answer.
	return 0, 0, false, false, nil
}

func (c *Cache) readOnce(k Key, fh fileHash, si uint64, dst []byte, dirtyOnly bool) (int, uint64, bool, readResult, error) {
	s := &c.sets[si]
	s.mu.Lock()
	fi := c.find(si, fh, k.Block)
	if fi < 0 || (dirtyOnly && !c.frames[fi].dirty) {
		s.mu.Unlock()
		return 0, 0, false, readMiss, nil
	}
	f := &c.frames[fi]
	gen, length, crc, seq, dirty := f.gen.Load(), int(f.length), f.crc, f.seq, f.dirty
	if length > len(dst) {
		s.mu.Unlock()
		return 0, 0, false, readMiss, invalidf("buffer of %d bytes for a block of %d", len(dst), length)
	}
	if !dirtyOnly {
		s.clock++
		f.lru = s.clock
	}
	s.mu.Unlock()

	bank, off := c.frameLoc(fi)
	_, rerr := bank.ReadAt(dst[:length], off)
	if f.gen.Load() != gen {
		return 0, 0, false, readRace, nil
	}
	if rerr == nil && checksum(dst[:length]) == crc {
		return length, seq, dirty, readHit, nil
	}

	// The frame's data does not match its tag: a torn write before a
	// crash, or damage on disk.
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.gen.Load() != gen || f.state != stateValid {
		return 0, 0, false, readRace, nil
	}
	c.st.corrupt.Add(1)
	if f.dirty {
		c.log.Error("dirty block failed its checksum", zap.String("file", k.File), zap.Uint64("block", k.Block), zap.Int("frame", fi), zap.NamedError("read_error", rerr))
		return 0, 0, false, readMiss, fmt.Errorf("blockcache: dirty %s block %d failed its checksum: %w", k.File, k.Block, errdefs.ErrDataLoss)
	}
	c.log.Debug("dropping clean block that failed its checksum", zap.String("file", k.File), zap.Uint64("block", k.Block), zap.Int("frame", fi), zap.NamedError("read_error", rerr))
	c.retire(fi)
	return 0, 0, false, readMiss, nil
}

// Put stores block k clean, as read from upstream. data is the whole block
// (shorter than BlockSize only for the last block of a file). If k is
// already cached, clean or dirty, Put does nothing: cached dirty data is
// newer than upstream. To make room Put evicts the least recently used clean
// block of the set; if there is none it stores nothing and returns an error
// wrapping ErrSetFull. Clean data is not fsynced: after a machine crash a
// clean frame may read back as a miss, never as wrong data.
func (c *Cache) Put(k Key, data []byte) error {
	return c.fill(k, data, false)
}

// PutVerified is Put after checking that the SHA-256 of data is digest (the
// imageserver's per-block digest). On a mismatch it stores nothing and
// returns an error wrapping errdefs.ErrDataLoss.
func (c *Cache) PutVerified(k Key, data, digest []byte) error {
	if len(digest) != sha256.Size {
		return invalidf("digest of %d bytes (want a SHA-256)", len(digest))
	}
	if sum := sha256.Sum256(data); !bytes.Equal(sum[:], digest) {
		return fmt.Errorf("blockcache: %s block %d: SHA-256 %x, want %x: %w", k.File, k.Block, sum, digest, errdefs.ErrDataLoss)
	}
	return c.fill(k, data, false)
}

// Write stores block k dirty (write-back). When it returns, the data is on
// stable storage (unless Config.UnsafeNoFsync) and stays in the cache until
// MarkClean: dirty blocks are never evicted. The new version goes to a free
// frame of the set and replaces the old one only once it is durable, so a
// crash during Write leaves the old or the new version, never neither. If
// every way of the set is dirty with other blocks it returns an error
// wrapping ErrSetFull and stores nothing.
func (c *Cache) Write(k Key, data []byte) error {
	return c.fill(k, data, true)
}

func (c *Cache) fill(k Key, data []byte, dirty bool) error {
	if err := c.check(k); err != nil {
		return err
	}
	if len(data) == 0 || len(data) > c.bs {
		return invalidf("block of %d bytes (want 1..%d)", len(data), c.bs)
	}
	fh, si, s := c.slot(k)
	if dirty {
		if err := c.names.ensure(k.File, fh); err != nil {
			return err
		}
	}
	t := tag{flags: flagValid, length: uint32(len(data)), block: k.Block, fh: fh, crc: checksum(data)}
	if dirty {
		t.flags |= flagDirty
	}

	s.mu.Lock()
	fi, err := c.reserve(s, si, fh, k.Block, dirty)
	if err != nil || fi < 0 {
		s.mu.Unlock()
		if err != nil {
			c.st.setFull.Add(1)
			return fmt.Errorf("%s block %d: %w", k.File, k.Block, err)
		}
		return nil
	}
	f := &c.frames[fi]
	t.seq = f.seq
	s.clock++
	t.lru = s.clock
	invalidateFirst := f.onDisk
	s.mu.Unlock()

	err = c.store(fi, invalidateFirst, data, &t, dirty)

	s.mu.Lock()
	defer s.mu.Unlock()
	defer c.wake(s)
	f.onDisk = true // or partly: either way it must be overwritten first
	if err != nil {
		c.release(fi)
		return fmt.Errorf("blockcache: store %s block %d: %w", k.File, k.Block, err)
	}
	if f.cancelled {
		c.release(fi)
		return nil
	}
	f.state = stateValid
	f.length, f.crc = t.length, t.crc
	f.lru, f.disk = t.lru, t.lru
	c.valid.Add(1)
	if !dirty {
		c.st.fills.Add(1)
		return nil
	}
	c.st.writes.Add(1)
	// The new version is durable: retire the older ones.
	base := int(si * c.stride)
	for i := base; i < base+int(c.stride); i++ {
		if o := &c.frames[i]; i != fi && o.state == stateValid && o.block == k.Block && o.fh == fh {
			c.retire(i)
		}
	}
	c.markDirty(k.File, k.Block, t.length)
	return nil
}

// reserve picks the frame of set si that will receive (fh, block) and marks
// it filling. It returns -1 and no error when there is nothing to do (Put of
// a cached block or of one being filled). Called with s.mu held; Write may
// wait on s.cond for a fill in progress to finish.
func (c *Cache) reserve(s *set, si uint64, fh fileHash, block uint64, dirty bool) (int, error) {
	base := int(si * c.stride)
	end := base + int(c.stride)
	for {
		old, free, victim := -1, -1, -1
		busy, waitable := false, false
		keys := 0
		for i := base; i < end; i++ {
			f := &c.frames[i]
			switch f.state {
			case stateFree:
				if free < 0 {
					free = i
				}
			case stateValid:
				keys++
				if f.block == block && f.fh == fh {
					old = i
				}
				if f.holds > 0 {
					waitable = true
				} else if !f.dirty && (victim < 0 || f.lru < c.frames[victim].lru) {
					victim = i
				}
			case stateFilling:
				waitable = true
				if f.block == block && f.fh == fh {
					busy = true
				} else if c.find(si, f.fh, f.block) < 0 {
					keys++ // a new block, not a new version of a cached one
				}
			}
		}
		if !dirty && (busy || old >= 0) {
			// Cached (clean or dirty: dirty is newer than upstream) or
			// being filled already.
			if old >= 0 {
				s.clock++
				c.frames[old].lru = s.clock
			}
			return -1, nil
		}
		if busy {
			c.wait(s) // one fill per block at a time keeps versions ordered
			continue
		}
		if (old < 0 && keys >= c.ways) || free < 0 {
			if victim < 0 {
				if dirty && waitable {
					c.wait(s)
					continue
				}
				return -1, ErrSetFull
			}
			c.evict(victim)
			free = victim
		}
		f := &c.frames[free]
		f.gen.Add(1)
		f.state = stateFilling
		f.fh, f.block = fh, block
		f.dirty, f.cancelled = dirty, false
		f.seq = c.seq.Add(1)
		return free, nil
	}
}

// store writes a reserved frame: data first, then its tag. For a dirty
// block each is made durable before the next step, so a durable dirty tag
// always describes durable data.
func (c *Cache) store(fi int, invalidateFirst bool, data []byte, t *tag, dirty bool) error {
	if invalidateFirst {
		// The old tag must not survive to describe the new data.
		if err := c.writeTag(fi, &tag{}); err != nil {
			return err
		}
	}
	bank, off := c.frameLoc(fi)
	if _, err := bank.WriteAt(data, off); err != nil {
		return err
	}
	if dirty {
		if err := c.bankSyncer(fi).Sync(); err != nil {
			return err
		}
	}
	if err := c.writeTag(fi, t); err != nil {
		return err
	}
	if dirty {
		return c.tagSync.Sync()
	}
	return nil
}

// retire frees a valid frame and invalidates its tag on disk. Called with
// the set's lock held.
func (c *Cache) retire(fi int) {
	c.valid.Add(-1)
	c.release(fi)
}

// release frees a frame and invalidates its tag on disk (not durably: a
// stale clean tag fails the data checksum, a stale dirty one loses to the
// newer version's sequence number). If that write fails, onDisk stays set
// and the next user of the frame tries again before writing data.
func (c *Cache) release(fi int) {
	f := &c.frames[fi]
	f.state = stateFree
	if f.onDisk && c.writeTag(fi, &tag{}) == nil {
		f.onDisk = false
	}
}

// evict frees a clean frame for immediate reuse by the caller, who
// invalidates its tag on disk before overwriting the data.
func (c *Cache) evict(fi int) {
	c.frames[fi].state = stateFree
	c.valid.Add(-1)
	c.st.evictions.Add(1)
}

func (c *Cache) wait(s *set) {
	if s.cond == nil {
		s.cond = sync.NewCond(&s.mu)
	}
	s.cond.Wait()
}

func (c *Cache) wake(s *set) {
	if s.cond != nil {
		s.cond.Broadcast()
	}
}

// MarkClean records that version seq of dirty block k (from ReadDirty) has
// been written back. If the block was rewritten since, it stays dirty and
// MarkClean returns an error wrapping ErrStale; flush it again. Cleaning an
// already clean block is a no-op; an unknown block is errdefs.ErrNotFound.
// The clean tag is made durable before the block may be evicted.
func (c *Cache) MarkClean(k Key, seq uint64) error {
	if err := c.check(k); err != nil {
		return err
	}
	fh, si, s := c.slot(k)
	s.mu.Lock()
	fi := c.find(si, fh, k.Block)
	if fi < 0 {
		s.mu.Unlock()
		return fmt.Errorf("blockcache: %s block %d is not cached: %w", k.File, k.Block, errdefs.ErrNotFound)
	}
	f := &c.frames[fi]
	if !f.dirty {
		s.mu.Unlock()
		return nil
	}
	if f.seq != seq {
		s.mu.Unlock()
		c.st.staleCleans.Add(1)
		return fmt.Errorf("%s block %d: version %d, flushed %d: %w", k.File, k.Block, f.seq, seq, ErrStale)
	}
	f.dirty = false
	t := f.tag()
	if err := c.writeTag(fi, &t); err != nil {
		f.dirty = true
		s.mu.Unlock()
		return fmt.Errorf("blockcache: mark %s block %d clean: %w", k.File, k.Block, err)
	}
	f.disk = f.lru
	// Until the clean tag is durable the frame must keep its data: were it
	// reused, a machine crash could bring back the dirty tag over new data.
	f.holds++
	// Under the set's lock: a rewrite publishing now must not have its
	// dirty entry removed by us.
	c.clearDirty(k.File, k.Block)
	s.mu.Unlock()
	c.st.cleaned.Add(1)

	err := c.tagSync.Sync()

	s.mu.Lock()
	f.holds--
	c.wake(s)
	s.mu.Unlock()
	return err
}

// Has reports whether block k is cached, without reading it or counting a
// hit or miss.
func (c *Cache) Has(k Key) bool {
	if c.check(k) != nil {
		return false
	}
	fh, si, s := c.slot(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	return c.find(si, fh, k.Block) >= 0
}

// Drop removes clean block k from the cache. It returns an error wrapping
// ErrDirty if k is dirty. Dropping a block that is not cached is a no-op.
func (c *Cache) Drop(k Key) error {
	if err := c.check(k); err != nil {
		return err
	}
	fh, si, s := c.slot(k)
	s.mu.Lock()
	n, dirty := c.dropIn(si, func(f *frame) bool { return f.block == k.Block && f.fh == fh })
	s.mu.Unlock()
	if dirty > 0 {
		return fmt.Errorf("%s block %d: %w", k.File, k.Block, ErrDirty)
	}
	if n > 0 {
		return c.tagSync.Sync()
	}
	return nil
}

// Invalidate drops every clean block of file, for example after the file
// changed upstream, and returns how many it dropped. Dirty blocks stay. It
// scans every set, so it costs time proportional to the cache's size.
func (c *Cache) Invalidate(file string) (int, error) {
	if err := c.check(Key{File: file}); err != nil {
		return 0, err
	}
	fh := hashFile(file)
	return c.dropAll(func(f *frame) bool { return f.fh == fh })
}

// DropClean drops every clean block and returns how many it dropped.
func (c *Cache) DropClean() (int, error) {
	if c.closed.Load() {
		return 0, ErrClosed
	}
	return c.dropAll(func(*frame) bool { return true })
}

// dropAll drops the clean frames match accepts from every set and makes
// that durable, so that a dropped block cannot come back after a crash.
func (c *Cache) dropAll(match func(*frame) bool) (int, error) {
	n := 0
	for si := range c.sets {
		s := &c.sets[si]
		s.mu.Lock()
		d, _ := c.dropIn(uint64(si), match)
		s.mu.Unlock()
		n += d
	}
	if n > 0 {
		return n, c.tagSync.Sync()
	}
	return 0, nil
}

// dropIn retires the clean frames of set si that match accepts, and cancels
// clean fills of them in progress. It returns how many it dropped and how
// many dirty ones it left. Called with the set's lock held.
func (c *Cache) dropIn(si uint64, match func(*frame) bool) (dropped, dirty int) {
	base := int(si * c.stride)
	for i := base; i < base+int(c.stride); i++ {
		f := &c.frames[i]
		if f.state == stateFree || !match(f) {
			continue
		}
		switch {
		case f.dirty:
			if f.state == stateValid {
				dirty++
			}
		case f.state == stateFilling:
			f.cancelled = true
		default:
			c.retire(i)
			dropped++
		}
	}
	c.st.dropped.Add(uint64(dropped))
	return dropped, dirty
}

func (c *Cache) markDirty(file string, block uint64, length uint32) {
	c.dirtyMu.Lock()
	defer c.dirtyMu.Unlock()
	m := c.dirty[file]
	if m == nil {
		m = make(map[uint64]uint32)
		c.dirty[file] = m
	}
	old, had := m[block]
	if had {
		c.dirtyBytes -= int64(old)
	} else {
		c.dirtyCount++
	}
	m[block] = length
	c.dirtyBytes += int64(length)
}

func (c *Cache) clearDirty(file string, block uint64) {
	c.dirtyMu.Lock()
	defer c.dirtyMu.Unlock()
	m := c.dirty[file]
	old, had := m[block]
	if !had {
		return
	}
	delete(m, block)
	if len(m) == 0 {
		delete(c.dirty, file)
	}
	c.dirtyCount--
	c.dirtyBytes -= int64(old)
}

// Dirty returns the dirty blocks of file in increasing order.
func (c *Cache) Dirty(file string) []uint64 {
	c.dirtyMu.Lock()
	defer c.dirtyMu.Unlock()
	blocks := make([]uint64, 0, len(c.dirty[file]))
	for b := range c.dirty[file] {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks)
	return blocks
}

// DirtyFiles returns the files that have dirty blocks, sorted.
func (c *Cache) DirtyFiles() []string {
	c.dirtyMu.Lock()
	defer c.dirtyMu.Unlock()
	files := make([]string, 0, len(c.dirty))
	for f := range c.dirty {
		files = append(files, f)
	}
	slices.Sort(files)
	return files
}

// Close writes the LRU stamps back to the tags, so that a reopened cache
// evicts in the same order, and releases the directory. In-flight calls must
// have returned.
func (c *Cache) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return ErrClosed
	}
	var errs []error
	written := 0
	for si := range c.sets {
		s := &c.sets[si]
		s.mu.Lock()
		base := si * int(c.stride)
		for i := base; i < base+int(c.stride); i++ {
			f := &c.frames[i]
			if f.state != stateValid || f.dirty || f.lru == f.disk {
				continue // a dirty frame is never evicted: its stamp can wait
			}
			t := f.tag()
			if err := c.writeTag(i, &t); err != nil {
				errs = append(errs, err)
				break
			}
			f.disk = f.lru
			written++
		}
		s.mu.Unlock()
		if len(errs) > 0 {
			break
		}
	}
	if !c.noSync {
		errs = append(errs, fdatasync(c.tags))
	}
	errs = append(errs, c.closeFiles())
	err := errors.Join(errs...)
	st := c.Stats()
	c.log.Info("block cache closed", zap.String("dir", c.dir),
		zap.Uint64("hits", st.Hits), zap.Uint64("misses", st.Misses),
		zap.Int64("valid_blocks", st.ValidBlocks), zap.Int("dirty_blocks", st.DirtyBlocks),
		zap.Int("lru_stamps_written", written), zap.Error(err))
	return err
}

func (f *frame) tag() tag {
	t := tag{flags: flagValid, length: f.length, block: f.block, fh: f.fh, seq: f.seq, lru: f.lru, crc: f.crc}
	if f.dirty {
		t.flags |= flagDirty
	}
	return t
}
