package blockcache

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/services/fsutil"
)

// Files in Config.Dir.
const (
	metaName  = "meta.json"
	tagsName  = "tags"
	namesName = "names"
	lockName  = "LOCK"
)

func bankName(b int) string { return fmt.Sprintf("bank-%04d", b) }

// Open opens the cache in cfg.Dir. A cache already there with the same
// geometry is reopened warm: every block it held is still cached, every
// dirty block still dirty. A cache with another geometry (or a damaged or
// half-created one) is recreated empty and a warning logged, unless it holds
// dirty blocks: then Open fails with an error wrapping
// errdefs.ErrFailedPrecondition rather than drop them.
func Open(cfg Config) (*Cache, error) {
	start := time.Now()
	geo, err := cfg.geometry()
	if err != nil {
		return nil, err
	}
	log := services.LoggerOr(cfg.Logger)
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("blockcache: %w", err)
	}
	lock, err := lockDir(cfg.Dir)
	if err != nil {
		return nil, err
	}
	c := &Cache{
		log:    log,
		dir:    cfg.Dir,
		geo:    geo,
		bs:     geo.BlockSize,
		ways:   geo.Ways,
		stride: geo.stride(),
		noSync: cfg.UnsafeNoFsync,
		lock:   lock,
		dirty:  make(map[string]map[uint64]uint32),
	}
	if err := c.open(); err != nil {
		c.closeFiles()
		return nil, err
	}
	st := c.Stats()
	log.Info("block cache opened", zap.String("dir", c.dir), zap.Stringer("geometry", geo),
		zap.Int64("capacity", st.Capacity), zap.Int64("valid_blocks", st.ValidBlocks),
		zap.Int("dirty_blocks", st.DirtyBlocks), zap.Int64("dirty_bytes", st.DirtyBytes),
		zap.Bool("sync", !c.noSync), zap.Duration("took", time.Since(start)))
	return c, nil
}

func (c *Cache) open() error {
	warm, err := c.prepare()
	if err != nil {
		return err
	}
	c.sets = make([]set, c.geo.Sets)
	c.frames = make([]frame, c.geo.frames())
	if c.tags, err = os.OpenFile(filepath.Join(c.dir, tagsName), os.O_RDWR, 0); err != nil {
		return fmt.Errorf("blockcache: %w", err)
	}
	c.tagSync = newSyncer(c.tags, c.noSync)
	for b := range c.geo.Banks {
		f, err := os.OpenFile(filepath.Join(c.dir, bankName(b)), os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("blockcache: %w", err)
		}
		c.banks = append(c.banks, f)
		c.bankSync = append(c.bankSync, newSyncer(f, c.noSync))
	}
	if c.names, err = loadNames(filepath.Join(c.dir, namesName), c.noSync); err != nil {
		return fmt.Errorf("blockcache: %w", err)
	}
	if warm {
		if err := c.loadTags(); err != nil {
			return fmt.Errorf("blockcache: load tags: %w", err)
		}
	}
	keep := make(map[fileHash]bool)
	for i := range c.frames {
		if f := &c.frames[i]; f.state == stateValid && f.dirty {
			keep[f.fh] = true
		}
	}
	if err := c.names.compact(keep); err != nil {
		return fmt.Errorf("blockcache: compact names: %w", err)
	}
	return nil
}

// prepare checks the cache on disk against the wanted geometry and
// recreates it if they differ. It reports whether the cache is warm.
func (c *Cache) prepare() (warm bool, err error) {
	old, err := readMeta(c.dir)
	var reason string
	switch {
	case err == nil && old == c.geo:
		missing := c.missingFile()
		if missing == "" {
			return true, nil
		}
		reason = "missing " + missing
	case err == nil:
		reason = "geometry changed"
	case errors.Is(err, fs.ErrNotExist):
		reason = "no meta file"
	default:
		reason = "unreadable meta: " + err.Error()
	}
	dirty, err := countDirty(filepath.Join(c.dir, tagsName))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("blockcache: %w", err)
	}
	if dirty > 0 {
		return false, fmt.Errorf("blockcache: %s holds %d dirty blocks, not recreating it (%s; on disk: %v; wanted: %v): "+
			"open it with the geometry it was made with and flush them, or remove it to drop them: %w",
			c.dir, dirty, reason, old, c.geo, errdefs.ErrFailedPrecondition)
	}
	if err == nil {
		c.log.Warn("recreating block cache", zap.String("dir", c.dir), zap.String("reason", reason),
			zap.Stringer("old", old), zap.Stringer("new", c.geo))
	} else {
		c.log.Info("creating block cache", zap.String("dir", c.dir), zap.Stringer("geometry", c.geo))
	}
	return false, c.create()
}

// missingFile returns the name of a data file of the cache that is not
// there, or "".
func (c *Cache) missingFile() string {
	names := []string{tagsName}
	for b := range c.geo.Banks {
		names = append(names, bankName(b))
	}
	for _, n := range names {
		if _, err := os.Stat(filepath.Join(c.dir, n)); err != nil {
			return n
		}
	}
	return ""
}

func readMeta(dir string) (geometry, error) {
	var g geometry
	b, err := os.ReadFile(filepath.Join(dir, metaName))
	if err != nil {
		return g, err
	}
	if err := json.Unmarshal(b, &g); err != nil {
		return geometry{}, err
	}
	if g.Format != formatName {
		return g, fmt.Errorf("format %q, want %q", g.Format, formatName)
	}
	return g, nil
}

// countDirty counts the valid dirty tags in a tags file, whatever geometry
// wrote it: records are self-describing.
func countDirty(path string) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n := 0
	err = scanTags(f, func(_ int, t tag) {
		if t.valid() && t.dirty() {
			n++
		}
	})
	return n, err
}

// scanTags calls fn for every intact record of a tags file.
func scanTags(f *os.File, fn func(fi int, t tag)) error {
	buf := make([]byte, 4096*tagSize)
	fi := 0
	for off := int64(0); ; {
		n, err := f.ReadAt(buf, off)
		for i := 0; i+tagSize <= n; i += tagSize {
			if t, ok := decodeTag(buf[i : i+tagSize]); ok {
				fn(fi, t)
			}
			fi++
		}
		off += int64(n)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// create makes an empty cache: sparse tags and bank files, an empty name
// journal, and last the meta file, renamed into place so that a cache
// without one is known to be half made.
func (c *Cache) create() error {
	if err := os.Remove(filepath.Join(c.dir, metaName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("blockcache: %w", err)
	}
	if err := fsutil.SyncDir(c.dir); err != nil {
		return fmt.Errorf("blockcache: %w", err)
	}
	old, err := filepath.Glob(filepath.Join(c.dir, "bank-*"))
	if err != nil {
		return err
	}
	for _, p := range append(old, filepath.Join(c.dir, namesName), filepath.Join(c.dir, namesName+".tmp"), filepath.Join(c.dir, metaName+".tmp")) {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("blockcache: %w", err)
		}
	}
	sized := func(name string, size int64) error {
		f, err := os.OpenFile(filepath.Join(c.dir, name), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		return errors.Join(f.Truncate(size), f.Close())
	}
	// Truncating to zero and back leaves zeros: every tag fails its
	// checksum, every frame is free.
	if err := sized(tagsName, int64(c.geo.frames())*tagSize); err != nil {
		return fmt.Errorf("blockcache: %w", err)
	}
	for b := range c.geo.Banks {
		if err := sized(bankName(b), int64(c.geo.bankSets(b)*c.stride)*int64(c.bs)); err != nil {
			return fmt.Errorf("blockcache: %w", err)
		}
	}
	if err := sized(namesName, 0); err != nil {
		return fmt.Errorf("blockcache: %w", err)
	}
	meta, err := json.MarshalIndent(c.geo, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(c.dir, metaName), append(meta, '\n')); err != nil {
		return fmt.Errorf("blockcache: %w", err)
	}
	return nil
}

// loadTags reads the tags into the frames and repairs what a crash can
// leave: two versions of one block (the newer sequence number wins),
// records that do not belong where they are, and sets with more blocks
// than ways.
func (c *Cache) loadTags() error {
	var maxSeq uint64
	err := scanTags(c.tags, func(fi int, t tag) {
		if fi >= len(c.frames) || !t.valid() {
			return
		}
		f := &c.frames[fi]
		f.onDisk = true
		if t.length == 0 || int(t.length) > c.bs || c.setIndex(t.fh, t.block) != uint64(fi)/c.stride {
			return // not ours: invalidated below
		}
		f.state = stateValid
		f.fh, f.block, f.seq = t.fh, t.block, t.seq
		f.lru, f.disk = t.lru, t.lru
		f.length, f.crc, f.dirty = t.length, t.crc, t.dirty()
		maxSeq = max(maxSeq, t.seq)
	})
	if err != nil {
		return err
	}
	c.seq.Store(maxSeq)
	var dups, overfull, orphans int
	for si := range c.sets {
		base := si * int(c.stride)
		end := base + int(c.stride)
		dups += c.dropOlderVersions(base, end)
		overfull += c.trimSet(base, end)
		orphans += c.adoptSet(si, base, end)
	}
	if dups+overfull+orphans > 0 {
		c.log.Warn("repaired block cache tags after a crash", zap.Int("duplicate_versions", dups),
			zap.Int("overfull", overfull), zap.Int("orphans", orphans))
		return fdatasync(c.tags)
	}
	return nil
}

// dropOlderVersions releases the frames [base, end) of a set that are not
// valid, and the older of two versions of one block: a crash between a new
// version's tag and the old one's invalidation leaves both.
func (c *Cache) dropOlderVersions(base, end int) (dups int) {
	for i := base; i < end; i++ {
		f := &c.frames[i]
		if f.state != stateValid {
			if f.onDisk {
				c.release(i)
			}
			continue
		}
		for j := base; j < i; j++ {
			o := &c.frames[j]
			if o.state != stateValid || o.fh != f.fh || o.block != f.block {
				continue
			}
			dups++
			if o.seq > f.seq {
				c.release(i)
				break
			}
			c.release(j)
		}
	}
	return dups
}

// trimSet releases the least recently used clean blocks of a set that
// holds more blocks than ways.
func (c *Cache) trimSet(base, end int) (overfull int) {
	keys := 0
	for i := base; i < end; i++ {
		if c.frames[i].state == stateValid {
			keys++
		}
	}
	for ; keys > c.ways; keys-- {
		victim := -1
		for i := base; i < end; i++ {
			if f := &c.frames[i]; f.state == stateValid && !f.dirty && (victim < 0 || f.lru < c.frames[victim].lru) {
				victim = i
			}
		}
		if victim < 0 {
			break // all dirty: keep them all
		}
		c.release(victim)
		overfull++
	}
	return overfull
}

// adoptSet counts the valid blocks of set si, sets its clock and records
// its dirty blocks under their file ids.
func (c *Cache) adoptSet(si, base, end int) (orphans int) {
	for i := base; i < end; i++ {
		f := &c.frames[i]
		if f.state != stateValid {
			continue
		}
		c.sets[si].clock = max(c.sets[si].clock, f.lru)
		if f.dirty {
			name, ok := c.names.lookup(f.fh)
			if !ok {
				// Write records the id durably before the first dirty
				// tag naming it, so only damage to the journal gets here.
				c.log.Error("dropping dirty block whose file id is lost",
					zap.String("file_hash", fmt.Sprintf("%x", f.fh)), zap.Uint64("block", f.block))
				c.release(i)
				orphans++
				continue
			}
			c.markDirty(name, f.block, f.length)
		}
		c.valid.Add(1)
	}
	return orphans
}

func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("blockcache: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("blockcache: %s is in use by another cache: %w", dir, errdefs.ErrFailedPrecondition)
		}
		return nil, fmt.Errorf("blockcache: lock %s: %w", dir, err)
	}
	return f, nil
}

// closeFiles closes every file and releases the directory lock (closing
// the lock file drops the flock).
func (c *Cache) closeFiles() error {
	var errs []error
	for _, f := range c.banks {
		errs = append(errs, f.Close())
	}
	if c.tags != nil {
		errs = append(errs, c.tags.Close())
	}
	if c.names != nil {
		errs = append(errs, c.names.close())
	}
	if c.lock != nil {
		errs = append(errs, c.lock.Close())
	}
	return errors.Join(errs...)
}
