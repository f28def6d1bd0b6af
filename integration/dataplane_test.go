package integration

import (
	"encoding/json"
	"errors"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

type file = struct {
	kind imagev1.FileKind
	data []byte
}

// writeAt writes regions of a file through the FUSE view, in the order of
// their offsets (where regions overlap, the later offset's bytes win).
func writeAt(t *testing.T, path string, writes map[int64][]byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range slices.Sorted(maps.Keys(writes)) {
		b := writes[off]
		if _, err := f.WriteAt(b, off); err != nil {
			f.Close()
			t.Fatalf("write %d bytes at %d: %v", len(b), off, err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestComputeServerCrash writes a persistent disk through a compute
// server's view, kills the server with SIGKILL before anything was written
// back, restarts it on the same data directory (over the dead mount it
// left) and checks that the writes reach the image server: dirty blocks are
// durable in the local cache and written back at start.
func TestComputeServerCrash(t *testing.T) {
	is := startImageServer(t)
	ic := imageClient(t, is.Addr)
	rng := rand.New(rand.NewPCG(30, 30))
	const size = 8<<20 + 1000
	golden := sparseBytes(rng, size, 20, 200<<10)
	publishBytes(t, ic, "golden", map[string]file{"disk.raw": {imagev1.FileKind_FILE_KIND_DISK, golden}})
	if _, err := ic.API.CreateDisk(ctxT(t), &imagev1.CreateDiskRequest{Name: "disk", SourceImage: "golden"}); err != nil {
		t.Fatal(err)
	}

	cs := startComputeServer(t, is.Addr, "")
	path := filepath.Join(cs.Mnt, "disk", "disk.raw")
	ref := slices.Clone(golden)
	writes := map[int64][]byte{}
	for _, off := range []int64{0, 65535, 1 << 20, 3<<20 + 12345, size - 5000} {
		b := make([]byte, min(100_000, size-int(off)))
		testutil.RandomData(rng, b)
		writes[off] = b
		copy(ref[off:], b)
	}
	writeAt(t, path, writes)
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sameContent(t, "disk through the view", got, ref)
	st, err := cacheClient(t, cs.Addr).GetCacheStats(ctxT(t), &computev1.GetCacheStatsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.DirtyBlocks == 0 {
		t.Fatalf("no dirty blocks after writes: %v", st)
	}
	sameContent(t, "image server's copy before any write-back", fetchFile(t, ic, "disk", "disk.raw", size), golden)

	cs.kill9()
	if err := statErr(cs.Mnt); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("the killed server's mount: %v, want ENOTCONN", err)
	}
	sameContent(t, "image server's copy after the crash", fetchFile(t, ic, "disk", "disk.raw", size), golden)

	cs.restart() // writes back what the previous run left dirty, then mounts
	for _, want := range []string{"aborting and unmounting a FUSE view left by a killed process", "wrote back dirty blocks from the previous run"} {
		if !strings.Contains(cs.log.String(), want) {
			t.Errorf("the restarted compute server did not log %q", want)
		}
	}
	sameContent(t, "image server's copy after the restart", fetchFile(t, ic, "disk", "disk.raw", size), ref)
	got, err = os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sameContent(t, "disk through the new view", got, ref)

	// A flush is idempotent: nothing is left to write back.
	if out := run(t, "cache", "flush", "--server", cs.Addr); !strings.Contains(out, "nothing to write back") {
		t.Fatalf("vmgrid cache flush after the restart: %q", out)
	}
	resp, err := cacheClient(t, cs.Addr).Flush(ctxT(t), &computev1.FlushRequest{Disk: "disk"})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Disks) != 1 || resp.Disks[0].Blocks != 0 {
		t.Fatalf("second flush of the disk: %v", resp.Disks)
	}

	// SIGUSR1 writes back too (middleware-driven consistency).
	more := make([]byte, 3000)
	testutil.RandomData(rng, more)
	copy(ref[2<<20-1500:], more)
	writeAt(t, path, map[int64][]byte{2<<20 - 1500: more})
	cs.signal(syscall.SIGUSR1)
	waitFor(t, 10*time.Second, "SIGUSR1 write-back", func() bool {
		return string(fetchFile(t, ic, "disk", "disk.raw", size)) == string(ref)
	})
	if out := run(t, "cache", "flush", "--server", cs.Addr); !strings.Contains(out, "nothing to write back") {
		t.Fatalf("vmgrid cache flush after SIGUSR1: %q", out)
	}
}

// statErr is the error statfs(2) gets on path: a stat may be answered from
// the attributes the kernel cached, statfs always reaches the FUSE server.
func statErr(path string) error {
	var st syscall.Statfs_t
	return syscall.Statfs(path, &st)
}

// TestCascade: image server ← cache proxy ← compute servers. Compute
// server A warms the proxy; B, cold, reads the same files and the image
// server sends nothing more. A chain of two proxies works the same way.
func TestCascade(t *testing.T) {
	is := startImageServer(t)
	ic := imageClient(t, is.Addr)
	rng := rand.New(rand.NewPCG(31, 31))
	disk := sparseBytes(rng, 12<<20, 30, 256<<10)
	mem := testutil.MemoryLike(rng, 5<<20+3, 0.2, 0.3)
	publishBytes(t, ic, "img", map[string]file{
		"disk.raw":  {imagev1.FileKind_FILE_KIND_DISK, disk},
		"mem.state": {imagev1.FileKind_FILE_KIND_MEMORY_STATE, mem},
	})
	sent := func() float64 { return metric(t, is.Metrics, "vmgrid_imageserver_bytes_sent_total", "") }
	readAll := func(cs *computeServer) {
		t.Helper()
		for name, want := range map[string][]byte{"disk.raw": disk, "mem.state": mem} {
			got, err := os.ReadFile(filepath.Join(cs.Mnt, "img", name))
			if err != nil {
				t.Fatal(err)
			}
			sameContent(t, cs.name+": "+name, got, want)
		}
	}
	stats := func(cs *computeServer) *computev1.GetCacheStatsResponse {
		t.Helper()
		out := run(t, "cache", "stats", "--server", cs.Addr, "-o", "json")
		var servers []struct {
			Stats struct {
				FetchedBytes   string `json:"fetchedBytes"`
				FileCacheBytes string `json:"fileCacheBytes"`
			} `json:"stats"`
		}
		if err := json.Unmarshal([]byte(out), &servers); err != nil || len(servers) != 1 {
			t.Fatalf("vmgrid cache stats: %v\n%s", err, out)
		}
		st := servers[0].Stats
		r := &computev1.GetCacheStatsResponse{}
		r.FetchedBytes = parseU(t, st.FetchedBytes)
		r.FileCacheBytes = parseU(t, st.FileCacheBytes)
		return r
	}

	before := sent()
	lan := startCacheProxy(t, is.Addr)
	a := startComputeServer(t, lan.Addr, "")
	readAll(a)
	warm := sent()
	if warm <= before {
		t.Fatal("the image server sent nothing while A read through the proxy")
	}
	if st := stats(a); st.FetchedBytes == 0 || st.FileCacheBytes == 0 {
		t.Fatalf("A's cache stats: %v", st)
	}

	b := startComputeServer(t, lan.Addr, "")
	readAll(b)
	if st := stats(b); st.FetchedBytes == 0 || st.FileCacheBytes == 0 {
		t.Fatalf("B's cache stats: %v", st)
	}
	if now := sent(); now != warm {
		t.Fatalf("the image server sent %.0f more bytes for the cold B behind a warm proxy", now-warm)
	}

	// A emptied (vmgrid cache drop) reads again from the warm proxy.
	if out := run(t, "cache", "drop", "--server", a.Addr); !strings.Contains(out, "dropped") {
		t.Fatalf("vmgrid cache drop: %q", out)
	}
	fetched := stats(a).FetchedBytes
	readAll(a)
	if st := stats(a); st.FetchedBytes <= fetched {
		t.Fatalf("A fetched nothing after vmgrid cache drop (%d → %d bytes)", fetched, st.FetchedBytes)
	}
	if now := sent(); now != warm {
		t.Fatalf("the image server sent %.0f more bytes after A dropped its cache", now-warm)
	}

	// A chain: image server ← lan ← second ← C.
	second := startCacheProxy(t, lan.Addr)
	c := startComputeServer(t, second.Addr, "")
	readAll(c)
	if now := sent(); now != warm {
		t.Fatalf("the image server sent %.0f more bytes for a read through two proxies", now-warm)
	}
	if n := metric(t, second.Metrics, "vmgrid_cache_fetched_bytes_total", ""); n == 0 {
		t.Fatal("the second proxy fetched no blocks from the first")
	}
}

func parseU(t *testing.T, s string) uint64 {
	t.Helper()
	if s == "" {
		return 0
	}
	var n uint64
	for _, c := range s {
		if c < '0' || c > '9' {
			t.Fatalf("not a number: %q", s)
		}
		n = n*10 + uint64(c-'0')
	}
	return n
}
