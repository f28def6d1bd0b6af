package gvfs_test

import (
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/gvfs/internal/gvfstest"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// TestCloseWhileReading closes a proxy under sequential readers with
// read-ahead fetches in flight; the cache it leaves is sound.
func TestCloseWhileReading(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(8, 8))
	ref := make([]byte, 24<<20)
	testutil.RandomData(rng, ref)
	gvfstest.Publish(t, srv.Client, "img", gvfstest.GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: ref})
	dir := t.TempDir()
	for round := range 3 {
		p := gvfstest.NewProxy(t, srv.Srv.Addr(), dir)
		f, err := p.Open(gvfstest.Ctx(t), "img", "disk.raw")
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for g := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b := make([]byte, 256<<10)
				for off := g * len(ref) / 4; off < (g+1)*len(ref)/4; off += len(b) {
					n, err := f.ReadAt(gvfstest.Ctx(t), b, int64(off))
					if err != nil {
						return // closed under us: fine
					}
					if d := gvfstest.FirstDiff(b[:n], ref[off:off+n]); d != "equal" {
						t.Errorf("round %d: at %d: %s", round, off, d)
						return
					}
				}
			}()
		}
		time.Sleep(time.Duration(20+round*40) * time.Millisecond)
		gvfstest.CloseProxy(t, p)
		wg.Wait()
	}
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), dir)
	gvfstest.SameBytes(t, "after closes under readers", gvfstest.ReadVia(t, p, "img", "disk.raw", 0, len(ref)), ref)
}

// lateMissCache delays the first miss it reports until the block has been
// filled by another reader's fetch: the reader then asks for a block that is
// no longer in flight but already cached.
type lateMissCache struct {
	gvfs.BlockCache
	armed   atomic.Bool
	blocked chan struct{} // closed when the delayed reader waits
	filled  chan struct{} // closed after the first fill
	once    sync.Once
}

func (c *lateMissCache) Get(file string, block uint64, dst []byte) (int, bool, error) {
	n, ok, err := c.BlockCache.Get(file, block, dst)
	if !ok && err == nil && c.armed.CompareAndSwap(true, false) {
		close(c.blocked)
		<-c.filled
		time.Sleep(20 * time.Millisecond) // the fetch leaves the in-flight table
	}
	return n, ok, err
}

func (c *lateMissCache) Fill(file string, block uint64, data, digest []byte) error {
	err := c.BlockCache.Fill(file, block, data, digest)
	c.once.Do(func() { close(c.filled) })
	return err
}

// TestCollapseLateMiss: a reader that missed the cache just before another
// reader's fetch filled it does not fetch the block again.
func TestCollapseLateMiss(t *testing.T) {
	srv := testutil.StartServer(t, "")
	ref := make([]byte, 1<<20)
	testutil.RandomData(rand.New(rand.NewPCG(9, 9)), ref)
	gvfstest.Publish(t, srv.Client, "img", gvfstest.GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: ref})
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), "", func(c *gvfs.Config) { c.ReadAhead = -1 })
	lc := &lateMissCache{BlockCache: gvfs.BlockCacheOf(p), blocked: make(chan struct{}), filled: make(chan struct{})}
	lc.armed.Store(true)
	gvfs.SetBlockCache(p, lc)
	f, err := p.Open(gvfstest.Ctx(t), "img", "disk.raw")
	if err != nil {
		t.Fatal(err)
	}
	read := func(off int64) error {
		b := make([]byte, 5000)
		if _, err := f.ReadAt(gvfstest.Ctx(t), b, off); err != nil {
			return err
		}
		if d := gvfstest.FirstDiff(b, ref[off:off+5000]); d != "equal" {
			return errors.New(d)
		}
		return nil
	}
	late := make(chan error, 1)
	go func() { late <- read(70_000) }()
	<-lc.blocked
	if err := read(66_000); err != nil {
		t.Fatal(err)
	}
	if err := <-late; err != nil {
		t.Fatal(err)
	}
	if n := p.Stats().FetchedBlocks.Load(); n != 1 {
		t.Fatalf("two readers of one block caused %d upstream fetches", n)
	}
}
