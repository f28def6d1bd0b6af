package cacheproxy_test

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/gvfs/internal/gvfstest"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/gvfs/cacheproxy"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
)

// serveProxy serves a proxy over upstream as a cache proxy (ProxyService)
// on 127.0.0.1 and returns it with its address.
func serveProxy(t *testing.T, upstream string) (*gvfs.Proxy, string) {
	t.Helper()
	p := gvfstest.NewProxy(t, upstream, "")
	svc, err := cacheproxy.NewService(p)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := services.NewServer(services.Options{Name: "cacheproxy", Listen: "127.0.0.1:0", ShutdownTimeout: 5 * time.Second},
		func(gs *grpc.Server, _ prometheus.Registerer) error { svc.Register(gs); return nil })
	if err != nil {
		t.Fatal(err)
	}
	// Registered after NewProxy's cleanup, so it runs first: the server
	// stops before its proxy closes.
	gvfstest.Serve(t, srv)
	return p, srv.Addr()
}

// TestCascade: image server ← cache proxy ← compute servers. The first
// compute server warms the proxy; a second, cold one reads everything from
// the proxy and the image server sends nothing more. Proxies chain, whole
// files and write-back go through them too.
func TestCascade(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(20, 20))
	disk := gvfstest.SparseData(rng, 8<<20, 20, 256<<10)
	mem := testutil.MemoryLike(rng, 3<<20+5, 0.2, 0.2)
	gvfstest.Publish(t, srv.Client, "img",
		gvfstest.GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: disk},
		gvfstest.GoldenFile{Name: "mem.state", Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, Data: mem})
	lan, lanAddr := serveProxy(t, srv.Srv.Addr())
	second, secondAddr := serveProxy(t, lanAddr) // a chain: image server ← lan ← second

	readAll := func(t *testing.T, p *gvfs.Proxy) {
		t.Helper()
		mnt := gvfstest.Mount(t, p)
		for name, want := range map[string][]byte{"disk.raw": disk, "mem.state": mem} {
			got, err := os.ReadFile(filepath.Join(mnt, "img", name))
			if err != nil {
				t.Fatal(err)
			}
			gvfstest.SameBytes(t, name, got, want)
		}
	}
	a := gvfstest.NewProxy(t, lanAddr, "")
	readAll(t, a)
	warmBlocks, warmFiles := lan.Stats().FetchedBytes.Load(), lan.FileCache().Received()
	if warmBlocks == 0 || warmFiles == 0 {
		t.Fatalf("the cache proxy fetched %d block bytes and %d file bytes while A read through it", warmBlocks, warmFiles)
	}
	b := gvfstest.NewProxy(t, lanAddr, "")
	readAll(t, b)
	if got := b.Stats().FetchedBytes.Load(); got != warmBlocks {
		t.Fatalf("B fetched %d block bytes from the proxy, A made it fetch %d", got, warmBlocks)
	}
	if lan.Stats().FetchedBytes.Load() != warmBlocks || lan.FileCache().Received() != warmFiles {
		t.Fatalf("the image server sent more for the cold B: %d→%d block bytes, %d→%d file bytes",
			warmBlocks, lan.Stats().FetchedBytes.Load(), warmFiles, lan.FileCache().Received())
	}
	if lan.Stats().Hits.Load() == 0 {
		t.Fatal("the cache proxy answered B from nowhere: no hits")
	}

	t.Run("chain", func(t *testing.T) {
		c := gvfstest.NewProxy(t, secondAddr, "")
		readAll(t, c)
		if lan.Stats().FetchedBytes.Load() != warmBlocks {
			t.Fatal("a read through two proxies reached the image server although the first proxy was warm")
		}
		if second.Stats().FetchedBytes.Load() == 0 {
			t.Fatal("the second proxy fetched nothing")
		}
	})

	t.Run("write-back", func(t *testing.T) {
		const size = 1 << 20
		golden := make([]byte, size)
		testutil.RandomData(rng, golden)
		gvfstest.DiskImage(t, srv.Client, "golden", "disk", golden)
		c := gvfstest.NewProxy(t, lanAddr, "")
		direct := gvfstest.NewProxy(t, srv.Srv.Addr(), "")
		// c warms itself and the proxy.
		gvfstest.SameBytes(t, "c before", gvfstest.ReadVia(t, c, "disk", "disk.raw", 0, size), golden)

		// A write-back through the proxy reaches the image server, and the
		// proxy serves the new content.
		ref := slices.Clone(golden)
		patch := make([]byte, 100_000)
		testutil.RandomData(rng, patch)
		copy(ref[5000:], patch)
		f, err := c.Open(gvfstest.Ctx(t), "disk", "disk.raw")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(gvfstest.Ctx(t), patch, 5000); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Flush(gvfstest.Ctx(t), "disk"); err != nil {
			t.Fatal(err)
		}
		gvfstest.SameBytes(t, "image server's copy", gvfstest.FetchAll(t, srv.Client, "disk", "disk.raw", size), ref)
		d := gvfstest.NewProxy(t, lanAddr, "")
		gvfstest.SameBytes(t, "a cold reader through the proxy", gvfstest.ReadVia(t, d, "disk", "disk.raw", 0, size), ref)

		// Another plant writes the disk at the image server, past the
		// proxy: once the proxy's and c's manifests are a second old, c
		// sees it through the proxy.
		patch2 := make([]byte, 70_000)
		testutil.RandomData(rng, patch2)
		copy(ref[600_000:], patch2)
		g, err := direct.Open(gvfstest.Ctx(t), "disk", "disk.raw")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := g.WriteAt(gvfstest.Ctx(t), patch2, 600_000); err != nil {
			t.Fatal(err)
		}
		if _, err := direct.Flush(gvfstest.Ctx(t), "disk"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2*gvfs.DiskRecheck + 100*time.Millisecond)
		gvfstest.SameBytes(t, "c after a write past the proxy", gvfstest.ReadVia(t, c, "disk", "disk.raw", 0, size), ref)
	})
}

// TestProxyAsksInRuns: a plant's read of a run of blocks reaches the
// image server as runs too. The proxy's readers answer a request block by
// block, but it starts the request's misses at once, so it asks its
// upstream no more often than its client asked it (it once asked a block
// at a time: four blocks a round trip through a proxy on a WAN).
func TestProxyAsksInRuns(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(21, 21))
	mem := testutil.MemoryLike(rng, 6<<20, 0.1, 0.1)
	gvfstest.Publish(t, srv.Client, "img",
		gvfstest.GoldenFile{Name: "mem.ram", Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, Policy: imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS, Data: mem})
	lan, lanAddr := serveProxy(t, srv.Srv.Addr())
	a := gvfstest.NewProxy(t, lanAddr, "")
	gvfstest.SameBytes(t, "mem.ram through the proxy", gvfstest.ReadVia(t, a, "img", "mem.ram", 0, len(mem)), mem)
	asked, fetched := a.Stats().Requests.Load(), a.Stats().FetchedBlocks.Load()
	if asked == 0 || fetched < 4*asked {
		t.Fatalf("the plant asked %d times for %d blocks: not in runs, nothing to test", asked, fetched)
	}
	t.Logf("plant: %d requests, %d blocks; proxy: %d requests, %d blocks", asked, fetched, lan.Stats().Requests.Load(), lan.Stats().FetchedBlocks.Load())
	if got := lan.Stats().Requests.Load(); got > asked {
		t.Fatalf("the proxy asked its upstream %d times for the %d blocks its client asked for in %d requests", got, fetched, asked)
	}
	if got := lan.Stats().FetchedBlocks.Load(); got != fetched {
		t.Fatalf("the proxy fetched %d blocks, its client %d", got, fetched)
	}

	// The classes go through: a plant's hydration reaches the image
	// server as background reads.
	mem2 := testutil.MemoryLike(rng, 2<<20, 0.1, 0.1)
	gvfstest.Publish(t, srv.Client, "img2",
		gvfstest.GoldenFile{Name: "mem.ram", Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, Policy: imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS, Data: mem2})
	f, err := a.Open(gvfstest.Ctx(t), "img2", "mem.ram")
	if err != nil {
		t.Fatal(err)
	}
	demand := lan.Stats().ClassRequests[gvfs.Demand].Load()
	if err := f.Hydrate(gvfstest.Ctx(t), gvfs.Background, nil); err != nil {
		t.Fatal(err)
	}
	if got := lan.Stats().ClassRequests[gvfs.Background].Load(); got == 0 {
		t.Fatal("a hydration through the proxy reached the image server in no background request")
	}
	if got := lan.Stats().ClassRequests[gvfs.Demand].Load(); got != demand {
		t.Fatalf("a hydration through the proxy made %d demand requests upstream", got-demand)
	}

	// A stream naming a class there is not is refused.
	cc, err := services.Dial(lanAddr, services.TLSFiles{})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx := metadata.AppendToOutgoingContext(gvfstest.Ctx(t), gvfs.ClassHeader, "urgent")
	rb, err := imagev1.NewImageServiceClient(cc).ReadBlocks(ctx)
	if err == nil {
		_, err = rb.Recv()
	}
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "urgent") {
		t.Fatalf("a stream of class \"urgent\": %v, want InvalidArgument naming it", err)
	}
}
