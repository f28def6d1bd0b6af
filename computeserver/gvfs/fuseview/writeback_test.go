package fuseview_test

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/gvfs/internal/gvfstest"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/internal/testutil"
)

// regions splits [0, size) at random unaligned points into n regions, one
// per writer: blocks that straddle a boundary are written by two writers at
// once, which is what the read-modify-write of partial blocks must survive.
func regions(rng *rand.Rand, size, n int) [][2]int {
	cuts := []int{0, size}
	for range n - 1 {
		cuts = append(cuts, 1+rng.IntN(size-1))
	}
	slices.Sort(cuts)
	out := make([][2]int, n)
	for i := range n {
		out[i] = [2]int{cuts[i], cuts[i+1]}
	}
	return out
}

// hammer runs writers goroutines, each writing random data (and runs of
// zeros) at random unaligned offsets of its own region and reading back
// random ranges of it, keeping ref up to date.
func hammer(t *testing.T, ref []byte, writers, ops int, seed uint64, write func([]byte, int64) (int, error), read func([]byte, int64) (int, error)) {
	t.Helper()
	regs := regions(rand.New(rand.NewPCG(seed, 0)), len(ref), writers)
	var wg sync.WaitGroup
	for g, r := range regs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(g)+1))
			lo, hi := r[0], r[1]
			if hi-lo < 2 {
				return
			}
			buf := make([]byte, 256<<10)
			for i := 0; i < ops && !t.Failed(); i++ {
				off := lo + rng.IntN(hi-lo)
				n := min(1+rng.IntN(len(buf)), hi-off)
				if rng.IntN(8) == 0 {
					n = min(1+rng.IntN(64), hi-off) // tiny writes: sub-page
				}
				b := buf[:n]
				if rng.IntN(3) < 2 {
					if rng.IntN(4) == 0 {
						clear(b)
					} else {
						testutil.RandomData(rng, b)
					}
					if got, err := write(b, int64(off)); err != nil || got != n {
						t.Errorf("writer %d: write %d bytes at %d: %d, %v", g, n, off, got, err)
						return
					}
					copy(ref[off:], b)
					continue
				}
				if got, err := read(b, int64(off)); err != nil || got != n {
					t.Errorf("writer %d: read %d bytes at %d: %d, %v", g, n, off, got, err)
					return
				}
				if d := gvfstest.FirstDiff(b, ref[off:off+n]); d != "equal" {
					t.Errorf("writer %d: read back %d bytes at %d: %s", g, n, off, d)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// TestRandomWritesAndFlush writes a persistent disk at random from many
// goroutines, through the FUSE view and through the proxy API, reads it
// back, flushes it and checks the image server's copy byte for byte.
func TestRandomWritesAndFlush(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(10, 10))
	const size = 6<<20 + 4321
	golden := gvfstest.SparseData(rng, size, 15, 256<<10)
	gvfstest.DiskImage(t, srv.Client, "golden", "via-fuse", golden)
	if _, err := srv.Client.API.CreateDisk(gvfstest.Ctx(t), gvfstest.CreateDisk("via-api", "golden")); err != nil {
		t.Fatal(err)
	}
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), "")
	mnt := gvfstest.Mount(t, p)

	for _, disk := range []string{"via-fuse", "via-api"} {
		t.Run(disk, func(t *testing.T) {
			ref := slices.Clone(golden)
			var write, read func([]byte, int64) (int, error)
			if disk == "via-fuse" {
				f, err := os.OpenFile(filepath.Join(mnt, disk, "disk.raw"), os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				write, read = f.WriteAt, f.ReadAt
			} else {
				f, err := p.Open(gvfstest.Ctx(t), disk, "disk.raw")
				if err != nil {
					t.Fatal(err)
				}
				write = func(b []byte, off int64) (int, error) { return f.WriteAt(gvfstest.Ctx(t), b, off) }
				read = func(b []byte, off int64) (int, error) { return f.ReadAt(gvfstest.Ctx(t), b, off) }
			}
			hammer(t, ref, 6, 60, 11, write, read)
			if t.Failed() {
				return
			}
			// Dropping the caches keeps dirty blocks.
			p.DropCaches()
			got := make([]byte, size)
			if _, err := read(got, 0); err != nil {
				t.Fatal(err)
			}
			gvfstest.SameBytes(t, "disk after writes", got, ref)
			gvfstest.SameBytes(t, "image server's copy before the flush", gvfstest.FetchAll(t, srv.Client, disk, "disk.raw", size), golden)

			res, err := p.Flush(gvfstest.Ctx(t), disk)
			if err != nil {
				t.Fatal(err)
			}
			if res.Blocks == 0 || res.Generation == 0 {
				t.Fatalf("flush: %+v", res)
			}
			gvfstest.SameBytes(t, "image server's copy after the flush", gvfstest.FetchAll(t, srv.Client, disk, "disk.raw", size), ref)
			again, err := p.Flush(gvfstest.Ctx(t), disk)
			if err != nil {
				t.Fatal(err)
			}
			if again.Blocks != 0 || again.Generation != res.Generation {
				t.Fatalf("second flush wrote %d blocks (generation %d after %d): a flush must be idempotent", again.Blocks, again.Generation, res.Generation)
			}
			// A cold proxy reads the disk back from the image server.
			cold := gvfstest.NewProxy(t, srv.Srv.Addr(), "")
			gvfstest.SameBytes(t, "disk through a cold proxy", gvfstest.ReadVia(t, cold, disk, "disk.raw", 0, size), ref)
			// And the writer still reads its own writes.
			if _, err := read(got, 0); err != nil {
				t.Fatal(err)
			}
			gvfstest.SameBytes(t, "disk after the flush", got, ref)
		})
	}
	if all, err := p.FlushAll(gvfstest.Ctx(t)); err != nil || len(all) != 0 {
		t.Fatalf("FlushAll after every disk was flushed: %v, %v", all, err)
	}
}

// TestWritesDuringFlush keeps writing while flushes run: nothing written is
// lost, whichever side of a flush it landed on.
func TestWritesDuringFlush(t *testing.T) {
	srv := testutil.StartServer(t, "")
	const size = 4 << 20
	golden := make([]byte, size)
	gvfstest.DiskImage(t, srv.Client, "golden", "disk", golden)
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), "")
	f, err := p.Open(gvfstest.Ctx(t), "disk", "disk.raw")
	if err != nil {
		t.Fatal(err)
	}
	ref := slices.Clone(golden)
	stop := make(chan struct{})
	flushed := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				flushed <- nil
				return
			default:
			}
			if _, err := p.Flush(gvfstest.Ctx(t), "disk"); err != nil {
				flushed <- err
				return
			}
		}
	}()
	hammer(t, ref, 4, 80, 12,
		func(b []byte, off int64) (int, error) { return f.WriteAt(gvfstest.Ctx(t), b, off) },
		func(b []byte, off int64) (int, error) { return f.ReadAt(gvfstest.Ctx(t), b, off) })
	close(stop)
	if err := <-flushed; err != nil {
		t.Fatal(err)
	}
	if _, err := p.Flush(gvfstest.Ctx(t), "disk"); err != nil {
		t.Fatal(err)
	}
	gvfstest.SameBytes(t, "image server's copy", gvfstest.FetchAll(t, srv.Client, "disk", "disk.raw", size), ref)
}

// TestDiskGeneration: a proxy that cached a disk's blocks sees what another
// proxy wrote and flushed once it opens the disk again (the image server's
// generation tells it its clean blocks are stale).
func TestDiskGeneration(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(13, 13))
	const size = 2 << 20
	golden := make([]byte, size)
	testutil.RandomData(rng, golden)
	gvfstest.DiskImage(t, srv.Client, "golden", "disk", golden)

	a := gvfstest.NewProxy(t, srv.Srv.Addr(), "")
	b := gvfstest.NewProxy(t, srv.Srv.Addr(), "")
	bAPI := gvfstest.NewProxy(t, srv.Srv.Addr(), "")
	mntB := gvfstest.Mount(t, b)
	pathB := filepath.Join(mntB, "disk", "disk.raw")
	got, err := os.ReadFile(pathB)
	if err != nil {
		t.Fatal(err)
	}
	gvfstest.SameBytes(t, "B before", got, golden)
	gvfstest.SameBytes(t, "B (API) before", gvfstest.ReadVia(t, bAPI, "disk", "disk.raw", 0, size), golden)

	ref := slices.Clone(golden)
	patch := make([]byte, 300<<10)
	testutil.RandomData(rng, patch)
	copy(ref[100_000:], patch)
	fa, err := a.Open(gvfstest.Ctx(t), "disk", "disk.raw")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fa.WriteAt(gvfstest.Ctx(t), patch, 100_000); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Flush(gvfstest.Ctx(t), "disk"); err != nil {
		t.Fatal(err)
	}
	// A's own clean blocks are current: reopening the disk (its manifest,
	// fetched before the flush, still cached) must not drop them.
	before := a.Stats().FetchedBytes.Load()
	gvfstest.SameBytes(t, "A after its flush", gvfstest.ReadVia(t, a, "disk", "disk.raw", 100_000, len(patch)), patch)
	if after := a.Stats().FetchedBytes.Load(); after != before {
		t.Fatalf("A fetched %d bytes of blocks it wrote and flushed itself", after-before)
	}
	// B keeps the manifest of a disk (and the kernel its entry) for a
	// second; after that, opening the disk again shows the new content.
	time.Sleep(gvfs.DiskRecheck + 100*time.Millisecond)
	got, err = os.ReadFile(pathB)
	if err != nil {
		t.Fatal(err)
	}
	gvfstest.SameBytes(t, "B through FUSE after A's flush", got, ref)
	gvfstest.SameBytes(t, "B (API) after A's flush", gvfstest.ReadVia(t, bAPI, "disk", "disk.raw", 0, size), ref)
	gvfstest.SameBytes(t, "A, manifest refreshed", gvfstest.ReadVia(t, a, "disk", "disk.raw", 100_000, len(patch)), patch)
	if after := a.Stats().FetchedBytes.Load(); after != before {
		t.Fatalf("A fetched %d bytes of blocks it wrote and flushed itself", after-before)
	}
}

// TestDiskZeroBlocksCached: a persistent disk has no zero map (its blocks
// change), so the image server answers its zero blocks as zero; once
// answered they are cached like any block and not asked for again.
func TestDiskZeroBlocksCached(t *testing.T) {
	srv := testutil.StartServer(t, "")
	const size = 8 << 20
	golden := gvfstest.SparseData(rand.New(rand.NewPCG(14, 14)), size, 3, 100<<10)
	gvfstest.DiskImage(t, srv.Client, "golden", "disk", golden)
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), "", func(c *gvfs.Config) { c.ReadAhead = -1 })
	gvfstest.SameBytes(t, "first read", gvfstest.ReadVia(t, p, "disk", "disk.raw", 0, size), golden)
	reqs := p.Stats().Requests.Load()
	gvfstest.SameBytes(t, "second read", gvfstest.ReadVia(t, p, "disk", "disk.raw", 0, size), golden)
	if n := p.Stats().Requests.Load() - reqs; n != 0 {
		t.Fatalf("the second read of a disk sent %d requests upstream", n)
	}
	// A zero block written afterwards reads back as written.
	f, err := p.Open(gvfstest.Ctx(t), "disk", "disk.raw")
	if err != nil {
		t.Fatal(err)
	}
	ref := slices.Clone(golden)
	for i := range 5000 {
		ref[size/2+i] = byte(i) | 1
	}
	if _, err := f.WriteAt(gvfstest.Ctx(t), ref[size/2:size/2+5000], size/2); err != nil {
		t.Fatal(err)
	}
	gvfstest.SameBytes(t, "after a write into a zero block", gvfstest.ReadVia(t, p, "disk", "disk.raw", 0, size), ref)
}
