package fuseview_test

import (
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/gvfs/internal/gvfstest"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// randomRange picks a read: anywhere, across a block boundary, or at the
// start of a data region, of 1 byte to 300 KiB, often unaligned.
func randomRange(rng *rand.Rand, size, bs int) (off, n int) {
	switch rng.IntN(4) {
	case 0:
		off = rng.IntN(size)
	case 1: // straddle a block boundary
		off = max(0, (1+rng.IntN(size/bs))*bs-1-rng.IntN(5000))
	case 2: // the last bytes of the file
		off = max(0, size-1-rng.IntN(3*bs))
	default: // page aligned
		off = rng.IntN(size/4096) * 4096
	}
	return min(off, size-1), 1 + rng.IntN(300<<10)
}

// TestRandomReadsParallel reads random, unaligned ranges of a sparse golden
// disk through the FUSE view and through the proxy API from many goroutines
// at once, with a cache small enough to evict and with the caches dropped
// under the readers, and compares every byte with the reference.
func TestRandomReadsParallel(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(1, 1))
	const size = 20<<20 + 12345 // a short last block
	ref := gvfstest.SparseData(rng, size, 40, 512<<10)
	gvfstest.Publish(t, srv.Client, "golden", gvfstest.GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: ref},
		gvfstest.GoldenFile{Name: "small-blocks.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, BS: 16 << 10, Data: ref[:size/3]})
	// 4 MiB in 4 ways: the file does not fit, so blocks are evicted and
	// fetched again while readers run.
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), "", func(c *gvfs.Config) { c.Cache = gvfs.CacheConfig{Capacity: 4 << 20, Ways: 4, BlockSize: 64 << 10} })
	mnt := gvfstest.Mount(t, p)

	check := func(t *testing.T, name string, want []byte, bs int, read func(b []byte, off int64) (int, error)) {
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(g), 7))
				buf := make([]byte, 300<<10)
				for i := 0; i < 60 && !t.Failed(); i++ {
					off, n := randomRange(rng, len(want), bs)
					got, err := read(buf[:n], int64(off))
					if err != nil && !errors.Is(err, io.EOF) {
						t.Errorf("%s: read %d bytes at %d: %v", name, n, off, err)
						return
					}
					end := min(off+n, len(want))
					if got != end-off {
						t.Errorf("%s: read %d bytes at %d: got %d, want %d", name, n, off, got, end-off)
						return
					}
					if d := gvfstest.FirstDiff(buf[:got], want[off:end]); d != "equal" {
						t.Errorf("%s: read %d bytes at %d: %s", name, n, off, d)
						return
					}
				}
			}()
		}
		// Empty the caches (and the kernel's page cache of the view) under
		// the readers.
		stop := make(chan struct{})
		dropped := make(chan struct{})
		go func() {
			defer close(dropped)
			for {
				select {
				case <-stop:
					return
				case <-time.After(100 * time.Millisecond):
					p.DropCaches()
				}
			}
		}()
		wg.Wait()
		close(stop)
		<-dropped
	}

	for _, c := range []struct {
		file string
		want []byte
		bs   int
	}{{"disk.raw", ref, 64 << 10}, {"small-blocks.raw", ref[:size/3], 16 << 10}} {
		t.Run("fuse/"+c.file, func(t *testing.T) {
			f, err := os.Open(filepath.Join(mnt, "golden", c.file))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if st, err := f.Stat(); err != nil || st.Size() != int64(len(c.want)) || st.Mode().Perm() != 0o444 {
				t.Fatalf("stat: %v %v", st, err)
			}
			check(t, c.file, c.want, c.bs, f.ReadAt)
		})
		t.Run("api/"+c.file, func(t *testing.T) {
			f, err := p.Open(gvfstest.Ctx(t), "golden", c.file)
			if err != nil {
				t.Fatal(err)
			}
			check(t, c.file, c.want, c.bs, func(b []byte, off int64) (int, error) { return f.ReadAt(gvfstest.Ctx(t), b, off) })
		})
	}
	t.Run("whole", func(t *testing.T) {
		got, err := os.ReadFile(filepath.Join(mnt, "golden", "disk.raw"))
		if err != nil {
			t.Fatal(err)
		}
		gvfstest.SameBytes(t, "whole file", got, ref)
	})
	if s := p.Stats(); s.Hits.Load() == 0 || s.Misses.Load() == 0 || s.ZeroBlocks.Load() == 0 {
		t.Fatalf("hits %d misses %d zero blocks %d: every path should have been taken", s.Hits.Load(), s.Misses.Load(), s.ZeroBlocks.Load())
	}
}

// TestWholeFilePolicy reads a memory state file (WHOLE_FILE: one compressed
// stream into the file cache) through the view.
func TestWholeFilePolicy(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(2, 2))
	mem := testutil.MemoryLike(rng, 8<<20+777, 0.22, 0.3)
	m := gvfstest.Publish(t, srv.Client, "vm", gvfstest.GoldenFile{Name: "mem.state", Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, Data: mem})
	meta := m.Files[0]
	if meta.Policy != imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE {
		t.Fatalf("policy %v", meta.Policy)
	}
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), "")
	mnt := gvfstest.Mount(t, p)
	path := filepath.Join(mnt, "vm", "mem.state")

	// Readers of the head and of the tail start together with the first
	// fetch; all of them see the right bytes.
	var wg sync.WaitGroup
	for _, off := range []int{0, 4096, len(mem) / 2, len(mem) - 100} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := os.Open(path)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			b := make([]byte, 100)
			if _, err := f.ReadAt(b, int64(off)); err != nil {
				t.Error(err)
				return
			}
			if d := gvfstest.FirstDiff(b, mem[off:off+100]); d != "equal" {
				t.Errorf("at %d: %s", off, d)
			}
		}()
	}
	wg.Wait()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	gvfstest.SameBytes(t, "mem.state", got, mem)
	gvfstest.WaitComplete(t, p, "vm", "mem.state")
	if n := p.Stats().FetchedBytes.Load(); n != 0 {
		t.Fatalf("%d bytes came through the block channel for a whole-file file", n)
	}
	if r := p.FileCache().Received(); r < meta.NonzeroBytes || r > meta.Size {
		t.Fatalf("the file cache received %d bytes for %d non-zero bytes", r, meta.NonzeroBytes)
	}
}

// TestZeroBlocksNeverFetched reads a mostly-zero disk: only blocks holding
// data cross the wire, the zero ones are answered from the zero map.
func TestZeroBlocksNeverFetched(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(3, 3))
	const size, bs = 32 << 20, 64 << 10
	ref := gvfstest.SparseData(rng, size, 6, 100<<10)
	gvfstest.Publish(t, srv.Client, "sparse", gvfstest.GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: ref})
	var want uint64 // bytes of the blocks with a non-zero page
	for off := 0; off < size; off += bs {
		for pg := off; pg < off+bs; pg += 4096 {
			if !isZero(ref[pg : pg+4096]) {
				want += bs
				break
			}
		}
	}
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), "")
	mnt := gvfstest.Mount(t, p)
	got, err := os.ReadFile(filepath.Join(mnt, "sparse", "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	gvfstest.SameBytes(t, "sparse disk", got, ref)
	s := p.Stats()
	if s.FetchedBytes.Load() != want {
		t.Fatalf("fetched %d bytes, want exactly the %d bytes of blocks holding data", s.FetchedBytes.Load(), want)
	}
	if s.ZeroBlocks.Load() == 0 {
		t.Fatal("no block was answered from the zero map")
	}
	t.Logf("%d KiB of %d MiB fetched; %d zero blocks answered locally", want>>10, size>>20, s.ZeroBlocks.Load())
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// TestCollapse: concurrent readers of one cold block cause one upstream
// fetch.
func TestCollapse(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(4, 4))
	ref := make([]byte, 8<<20)
	testutil.RandomData(rng, ref)
	gvfstest.Publish(t, srv.Client, "img", gvfstest.GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: ref})
	for round := range 20 {
		p := gvfstest.NewProxy(t, srv.Srv.Addr(), "", func(c *gvfs.Config) { c.ReadAhead = -1 })
		f, err := p.Open(gvfstest.Ctx(t), "img", "disk.raw")
		if err != nil {
			t.Fatal(err)
		}
		const readers = 16
		off := int64(round) * 300 << 10 // block round*300K/64K, read partly
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range readers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b := make([]byte, 1000+i)
				<-start
				if _, err := f.ReadAt(gvfstest.Ctx(t), b, off+int64(i)); err != nil {
					t.Error(err)
					return
				}
				if d := gvfstest.FirstDiff(b, ref[off+int64(i):off+int64(i)+int64(len(b))]); d != "equal" {
					t.Errorf("reader %d: %s", i, d)
				}
			}()
		}
		close(start)
		wg.Wait()
		s := p.Stats()
		if n := s.FetchedBlocks.Load(); n != 1 {
			t.Fatalf("round %d: %d readers of one cold block caused %d upstream fetches (%d collapsed)", round, readers, n, s.Collapsed.Load())
		}
		gvfstest.CloseProxy(t, p)
	}
}

// TestRestartWarm: a proxy reopened on the same directory serves what the
// previous one fetched without fetching it again.
func TestRestartWarm(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(5, 5))
	disk := gvfstest.SparseData(rng, 16<<20, 40, 256<<10)
	mem := testutil.MemoryLike(rng, 6<<20, 0.2, 0.2)
	gvfstest.Publish(t, srv.Client, "img",
		gvfstest.GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: disk},
		gvfstest.GoldenFile{Name: "mem.state", Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, Data: mem})
	dir := t.TempDir()
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), dir)
	mnt := gvfstest.Mount(t, p)
	for name, want := range map[string][]byte{"disk.raw": disk, "mem.state": mem} {
		got, err := os.ReadFile(filepath.Join(mnt, "img", name))
		if err != nil {
			t.Fatal(err)
		}
		gvfstest.SameBytes(t, name, got, want)
	}
	if p.Stats().FetchedBytes.Load() == 0 || p.FileCache().Received() == 0 {
		t.Fatal("the first proxy fetched nothing")
	}
	gvfstest.WaitComplete(t, p, "img", "mem.state")
	gvfstest.CloseProxy(t, p)
	if gvfstest.IsMounted(mnt) {
		t.Fatal("Close left the view mounted")
	}

	p = gvfstest.NewProxy(t, srv.Srv.Addr(), dir)
	mnt = gvfstest.Mount(t, p)
	for name, want := range map[string][]byte{"disk.raw": disk, "mem.state": mem} {
		got, err := os.ReadFile(filepath.Join(mnt, "img", name))
		if err != nil {
			t.Fatal(err)
		}
		gvfstest.SameBytes(t, name+" after restart", got, want)
	}
	if n, r := p.Stats().FetchedBytes.Load(), p.FileCache().Received(); n != 0 || r != 0 {
		t.Fatalf("the restarted proxy fetched %d block bytes and %d file bytes again", n, r)
	}
}

// TestDropCaches: after DropCaches every read is fetched again.
func TestDropCaches(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(6, 6))
	disk := make([]byte, 4<<20)
	testutil.RandomData(rng, disk)
	mem := testutil.MemoryLike(rng, 3<<20, 0.2, 0.2)
	gvfstest.Publish(t, srv.Client, "img",
		gvfstest.GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: disk},
		gvfstest.GoldenFile{Name: "mem.state", Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, Data: mem})
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), "")
	mnt := gvfstest.Mount(t, p)
	read := func() {
		for name, want := range map[string][]byte{"disk.raw": disk, "mem.state": mem} {
			got, err := os.ReadFile(filepath.Join(mnt, "img", name))
			if err != nil {
				t.Fatal(err)
			}
			gvfstest.SameBytes(t, name, got, want)
		}
	}
	read()
	fetched, received := p.Stats().FetchedBytes.Load(), p.FileCache().Received()
	if fetched != uint64(len(disk)) {
		t.Fatalf("fetched %d bytes of a %d-byte disk", fetched, len(disk))
	}
	gvfstest.WaitComplete(t, p, "img", "mem.state")
	read() // warm: kernel page cache
	if p.Stats().FetchedBytes.Load() != fetched || p.FileCache().Received() != received {
		t.Fatal("a warm read fetched again")
	}
	blocks, files := p.DropCaches()
	if blocks != len(disk)/(64<<10) || files != 1 {
		t.Fatalf("DropCaches dropped %d blocks and %d files", blocks, files)
	}
	read()
	if got := p.Stats().FetchedBytes.Load(); got != 2*fetched {
		t.Fatalf("after DropCaches %d bytes fetched in all, want %d: the read was not fetched again", got, 2*fetched)
	}
	if got := p.FileCache().Received(); got != 2*received {
		t.Fatalf("after DropCaches the file cache received %d bytes in all, want %d", got, 2*received)
	}
}

// TestErrors checks the errno of each kind of failure.
func TestErrors(t *testing.T) {
	srv := testutil.StartServer(t, "")
	ref := make([]byte, 1<<20)
	testutil.RandomData(rand.New(rand.NewPCG(7, 7)), ref)
	gvfstest.DiskImage(t, srv.Client, "golden", "disk", ref)
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), "")
	mnt := gvfstest.Mount(t, p)
	golden := filepath.Join(mnt, "golden", "disk.raw")
	disk := filepath.Join(mnt, "disk", "disk.raw")

	for _, path := range []string{filepath.Join(mnt, "nope"), filepath.Join(mnt, "nope", "disk.raw"), filepath.Join(mnt, "golden", "nope")} {
		if _, err := os.ReadFile(path); !errors.Is(err, syscall.ENOENT) {
			t.Errorf("read %s: %v, want ENOENT", path, err)
		}
	}
	// A golden file opens read-write (QEMU does that) but takes no writes.
	f, err := os.OpenFile(golden, os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("read-write open of a golden file: %v", err)
	}
	if _, err := f.WriteAt([]byte("x"), 10); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write to a golden file: %v, want EROFS", err)
	}
	f.Close()
	for _, path := range []string{golden, disk} {
		if err := os.Truncate(path, 4096); !errors.Is(err, syscall.EPERM) {
			t.Errorf("truncate %s: %v, want EPERM", path, err)
		}
	}
	f, err = os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("past the end"), int64(len(ref))-4); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write past the end of a disk: %v, want ENOSPC", err)
	}
	if _, err := f.WriteAt([]byte("fits"), 100); err != nil {
		t.Errorf("write to a disk: %v", err)
	}
	got, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	gvfstest.SameBytes(t, "golden after refused writes", got, ref)
}
