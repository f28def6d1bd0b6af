package fuseview_test

import (
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/vmgrid/vmgrid/computeserver/gvfs/internal/gvfstest"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Benchmarks of the data plane through a real FUSE mount over a real image
// server on loopback:
//
//	go test -run '^$' -bench . -benchtime 5x ./computeserver/gvfs/
//
// Warm: the proxy's block cache holds the file; the kernel's page cache of
// the FUSE file is dropped before every pass (posix_fadvise DONTNEED on the
// file: FUSE has no O_DIRECT by default, and /proc/sys/vm/drop_caches would
// also drop the page cache of the block cache's own files), so each pass
// measures the kernel → FUSE → proxy → block cache path. The "hot" variant
// leaves the page cache alone. Cold: DropCaches empties the proxy's caches
// before every pass, so every block comes from the image server. WAN: the
// upstream connection goes through toxiproxy adding 10 ms each way.

const (
	benchSeqSize = 256 << 20
	benchWANSize = 64 << 20
)

// benchFixture is an image server with a 256 MiB incompressible disk and a
// 64 MiB memory state, published once per benchmark function.
type benchFixture struct {
	srv *testutil.Server
}

func newBenchFixture(b *testing.B) *benchFixture {
	b.Helper()
	srv := testutil.StartServer(b, "")
	rng := rand.New(rand.NewPCG(99, 99))
	disk := make([]byte, benchSeqSize)
	testutil.RandomNonZero(rng, disk) // no zero pages: every block crosses the wire
	mem := testutil.MemoryLike(rng, benchWANSize, 0.22, 0.05)
	small := disk[:benchWANSize]
	gvfstest.Publish(b, srv.Client, "bench",
		gvfstest.GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: disk},
		gvfstest.GoldenFile{Name: "disk64.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: small},
		gvfstest.GoldenFile{Name: "mem.state", Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, Data: mem})
	return &benchFixture{srv: srv}
}

// dropFileCache drops the kernel's cached pages of one file.
func dropFileCache(b *testing.B, path string) {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		b.Fatal(err)
	}
}

// readSeq reads a file from start to end in 1 MiB reads.
func readSeq(b *testing.B, path string) int64 {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	var n int64
	for {
		got, err := f.Read(buf)
		n += int64(got)
		if err == io.EOF {
			return n
		}
		if err != nil {
			b.Fatal(err)
		}
	}
}

func catFile(b *testing.B, path string) {
	cmd := exec.Command("cat", path)
	null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer null.Close()
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = null, &stderr
	if err := cmd.Run(); err != nil {
		b.Fatalf("cat %s: %v %s", path, err, stderr.String())
	}
}

func reportProxy(b *testing.B, p *gvfs.Proxy, before Snapshot) {
	s := snapshot(p)
	n := float64(b.N)
	b.ReportMetric(float64(s.misses-before.misses)/n, "waits/op")
	b.ReportMetric(float64(s.requests-before.requests)/n, "upstream-reqs/op")
}

// Snapshot is what reportProxy compares.
type Snapshot struct{ misses, requests uint64 }

func snapshot(p *gvfs.Proxy) Snapshot {
	return Snapshot{misses: p.Stats().Misses.Load(), requests: p.Stats().Requests.Load()}
}

// BenchmarkSequentialRead: 256 MiB in 1 MiB reads through FUSE.
func BenchmarkSequentialRead(b *testing.B) {
	fx := newBenchFixture(b)
	p := gvfstest.NewProxy(b, fx.srv.Srv.Addr(), "", func(c *gvfs.Config) { c.Cache.Capacity = 1 << 30; c.Logger = nil })
	mnt := gvfstest.Mount(b, p)
	path := filepath.Join(mnt, "bench", "disk.raw")
	readSeq(b, path) // warm the proxy

	b.Run("warm", func(b *testing.B) {
		b.SetBytes(benchSeqSize)
		before := snapshot(p)
		for b.Loop() {
			b.StopTimer()
			dropFileCache(b, path)
			b.StartTimer()
			readSeq(b, path)
		}
		reportProxy(b, p, before)
	})
	b.Run("pagecache-hot", func(b *testing.B) {
		readSeq(b, path)
		b.SetBytes(benchSeqSize)
		for b.Loop() {
			readSeq(b, path)
		}
	})
	b.Run("cold-loopback", func(b *testing.B) {
		b.SetBytes(benchSeqSize)
		before := snapshot(p)
		for b.Loop() {
			b.StopTimer()
			p.DropCaches()
			dropFileCache(b, path)
			b.StartTimer()
			readSeq(b, path)
		}
		reportProxy(b, p, before)
	})
}

// BenchmarkRandomRead4K: random 4 KiB reads of the warm 256 MiB file
// through FUSE, by one reader and by 8 at once. Files are opened with
// POSIX_FADV_RANDOM (no kernel read-ahead: each read is one 4 KiB FUSE
// request) and pages are read in a random permutation, the file's page
// cache dropped whenever the permutation starts over, so every read reaches
// the proxy.
func BenchmarkRandomRead4K(b *testing.B) {
	fx := newBenchFixture(b)
	p := gvfstest.NewProxy(b, fx.srv.Srv.Addr(), "", func(c *gvfs.Config) { c.Cache.Capacity = 1 << 30; c.Logger = nil })
	mnt := gvfstest.Mount(b, p)
	path := filepath.Join(mnt, "bench", "disk.raw")
	readSeq(b, path)
	const pages = benchSeqSize / 4096
	open := func(b *testing.B) *os.File {
		f, err := os.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_RANDOM); err != nil {
			b.Fatal(err)
		}
		return f
	}
	perm := rand.New(rand.NewPCG(1, 2)).Perm(pages)
	var mu sync.Mutex
	next := 0
	take := func(b *testing.B) int64 {
		mu.Lock()
		defer mu.Unlock()
		if next%pages == 0 {
			dropFileCache(b, path)
		}
		off := int64(perm[next%pages]) * 4096
		next++
		return off
	}
	b.Run("readers=1", func(b *testing.B) {
		f := open(b)
		defer f.Close()
		buf := make([]byte, 4096)
		b.SetBytes(4096)
		for b.Loop() {
			if _, err := f.ReadAt(buf, take(b)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("readers=8", func(b *testing.B) {
		b.SetBytes(4096)
		b.SetParallelism(8 / runtime.GOMAXPROCS(0))
		b.RunParallel(func(pb *testing.PB) {
			f := open(b)
			defer f.Close()
			buf := make([]byte, 4096)
			for pb.Next() {
				if _, err := f.ReadAt(buf, take(b)); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// wanUpstream puts toxiproxy in front of addr, adding latency ms to each
// direction, and returns the address to dial.
func wanUpstream(b *testing.B, addr string, latency int) string {
	b.Helper()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	px := toxiproxy.NewProxy(srv, "upstream", "127.0.0.1:0", addr)
	if err := px.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(px.Stop)
	for _, dir := range []string{"upstream", "downstream"} {
		spec := `{"type":"latency","stream":"` + dir + `","attributes":{"latency":` + strconv.Itoa(latency) + `}}`
		if _, err := px.Toxics.AddToxicJson(strings.NewReader(spec)); err != nil {
			b.Fatal(err)
		}
	}
	return px.Listen
}

// BenchmarkWAN: a cold 64 MiB read block by block (disk: sequential 1 MiB
// reads, and cat) and through the whole-file channel (memory state: cat),
// over loopback and over an upstream 20 ms away (toxiproxy, 10 ms each
// way). The time should follow bytes ÷ bandwidth, not round trips: the 20 ms
// figures should exceed the loopback ones by a few round trips only.
func BenchmarkWAN(b *testing.B) {
	fx := newBenchFixture(b)
	for _, rtt := range []int{0, 20} {
		addr := fx.srv.Srv.Addr()
		if rtt > 0 {
			addr = wanUpstream(b, addr, rtt/2)
		}
		p := gvfstest.NewProxy(b, addr, "", func(c *gvfs.Config) { c.Cache.Capacity = 1 << 30; c.Logger = nil })
		mnt := gvfstest.Mount(b, p)
		for _, c := range []struct {
			name, file string
			read       func(*testing.B, string)
		}{
			{"blocks-1MiB-reads", "disk64.raw", func(b *testing.B, path string) { readSeq(b, path) }},
			{"blocks-cat", "disk64.raw", catFile},
			{"whole-file-cat", "mem.state", catFile},
		} {
			b.Run("rtt="+strconv.Itoa(rtt)+"ms/"+c.name, func(b *testing.B) {
				path := filepath.Join(mnt, "bench", c.file)
				b.SetBytes(benchWANSize)
				before := snapshot(p)
				for b.Loop() {
					b.StopTimer()
					p.DropCaches()
					dropFileCache(b, path)
					b.StartTimer()
					c.read(b, path)
				}
				reportProxy(b, p, before)
			})
		}
	}
}
