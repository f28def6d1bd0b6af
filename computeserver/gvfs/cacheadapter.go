package gvfs

import (
	"errors"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/blockcache"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// diskCache adapts blockcache.Cache to the proxy's blockCache.
type diskCache struct{ c *blockcache.Cache }

func openBlockCache(dir string, cfg CacheConfig, log *zap.Logger) (blockCache, error) {
	if cfg.Capacity == 0 {
		cfg.Capacity = 4 << 30
	}
	if cfg.Ways == 0 {
		cfg.Ways = 8
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = 64 << 10
	}
	c, err := blockcache.Open(blockcache.Config{Dir: dir, Capacity: cfg.Capacity, Ways: cfg.Ways, BlockSize: cfg.BlockSize, Logger: log})
	if err != nil {
		return nil, err
	}
	return diskCache{c}, nil
}

func (d diskCache) fits(data []byte) bool { return len(data) <= d.c.BlockSize() }

func (d diskCache) Get(file string, block uint64, dst []byte) (int, bool, error) {
	if !d.fits(dst) {
		return 0, false, nil
	}
	return d.c.Get(blockcache.Key{File: file, Block: block}, dst)
}

func (d diskCache) Has(file string, block uint64) bool {
	return d.c.Has(blockcache.Key{File: file, Block: block})
}

func (d diskCache) Fill(file string, block uint64, data, digest []byte) error {
	if !d.fits(data) {
		return errors.New("block larger than a cache frame")
	}
	k := blockcache.Key{File: file, Block: block}
	if digest != nil {
		return d.c.PutVerified(k, data, digest)
	}
	return d.c.Put(k, data)
}

func (d diskCache) Write(file string, block uint64, data []byte) error {
	if !d.fits(data) {
		return errors.New("the disk's blocks are larger than a cache frame; raise --cache-block-size")
	}
	return d.c.Write(blockcache.Key{File: file, Block: block}, data)
}

func (d diskCache) DirtyFiles() []string       { return d.c.DirtyFiles() }
func (d diskCache) Dirty(file string) []uint64 { return d.c.Dirty(file) }
func (d diskCache) BlockSize() int             { return d.c.BlockSize() }
func (d diskCache) Close() error               { return d.c.Close() }
func (d diskCache) Invalidate(file string) int { n, _ := d.c.Invalidate(file); return n }
func (d diskCache) DropClean() int             { n, _ := d.c.DropClean(); return n }

func (d diskCache) ReadDirty(file string, block uint64, dst []byte) (int, uint64, bool, error) {
	n, seq, err := d.c.ReadDirty(blockcache.Key{File: file, Block: block}, dst)
	if errdefs.IsNotFound(err) { // cleaned meanwhile
		return 0, 0, false, nil
	}
	if err != nil {
		return 0, 0, false, err
	}
	return n, seq, seq != 0, nil
}

func (d diskCache) MarkClean(file string, block uint64, seq uint64) error {
	err := d.c.MarkClean(blockcache.Key{File: file, Block: block}, seq)
	if errors.Is(err, blockcache.ErrStale) {
		return nil // written again meanwhile: stays dirty for the next flush
	}
	return err
}

func (d diskCache) Usage() (cached, capacity, dirty uint64) {
	s := d.c.Stats()
	return uint64(s.ValidBlocks), uint64(s.Sets) * uint64(s.Ways), uint64(s.DirtyBlocks)
}
