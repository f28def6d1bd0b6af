package computeserver

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
)

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("skipping: the compute server mounts FUSE file systems and needs root")
		os.Exit(0)
	}
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("google.golang.org/grpc/internal/grpcsync.(*CallbackSerializer).run"),
		goleak.IgnoreAnyFunction("github.com/klauspost/compress/zstd.(*blockDec).startDecoder"),
	)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// servePlant starts a compute server in-process and serves it until the
// test ends.
func servePlant(t *testing.T, cfg Config) *Server {
	t.Helper()
	cfg.Server = services.Options{Name: "computeserver", Listen: "127.0.0.1:0", ShutdownTimeout: 5 * time.Second}
	cfg.Tokens, cfg.ServiceTokenFile = testutil.Tokens(t), testutil.ServiceTokenFile(t)
	pl, err := Start(ctxT(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pl.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		for _, mnt := range []string{pl.Mountpoint, pl.MemoryMountpoint} {
			if isMounted(mnt) {
				t.Errorf("%s is still mounted after the compute server stopped", mnt)
				_ = exec.Command("fusermount3", "-u", "-z", mnt).Run()
			}
		}
	})
	return pl
}

func isMounted(dir string) bool {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}

func cacheClient(t *testing.T, addr string) computev1.CacheServiceClient {
	cc, err := services.Dial(addr, services.TLSFiles{}, testutil.As(testutil.OperatorToken))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return computev1.NewCacheServiceClient(cc)
}

func publishDisk(t *testing.T, c *imageclient.Client, data []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	spec := imageclient.PublishSpec{Name: "golden", Files: []imageclient.PublishFile{{Name: "disk.raw", Path: path, Kind: imagev1.FileKind_FILE_KIND_DISK}}}
	if _, err := c.Publish(ctxT(t), spec, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.API.CreateDisk(ctxT(t), &imagev1.CreateDiskRequest{Name: "disk", SourceImage: "golden"}); err != nil {
		t.Fatal(err)
	}
}

func serverCopy(t *testing.T, c *imageclient.Client, size int) []byte {
	t.Helper()
	out := make([]byte, size)
	err := c.FetchFile(ctxT(t), "disk", "disk.raw", 0, 0, func(off uint64, n uint32, data []byte) error {
		if data != nil {
			copy(out[off:], data)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestPlant runs a compute server in-process behind a cache proxy: reads
// through its view, writes written back after --flush-idle, and the
// CacheService (stats, flush, drop).
func TestPlant(t *testing.T) {
	is := testutil.StartServer(t, "")
	const size = 2 << 20
	golden := make([]byte, size)
	testutil.RandomData(rand.New(rand.NewPCG(1, 1)), golden[:size/2]) // the rest zero
	publishDisk(t, is.Client, golden)

	cp, err := StartCacheProxy(context.Background(), CacheProxyConfig{
		Server:   services.Options{Name: "cacheproxy", Listen: "127.0.0.1:0", ShutdownTimeout: 5 * time.Second},
		Upstream: is.Srv.Addr(), DataDir: t.TempDir(), Tokens: testutil.Tokens(t), ServiceTokenFile: testutil.ServiceTokenFile(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	cpCtx, cpCancel := context.WithCancel(context.Background())
	cpDone := make(chan error, 1)
	go func() { cpDone <- cp.Serve(cpCtx) }()
	t.Cleanup(func() { // after the plant's cleanup: it reads through the proxy
		cpCancel()
		<-cpDone
		cp.Close()
	})

	pl := servePlant(t, Config{Upstream: cp.Server.Addr(), DataDir: t.TempDir(), Proxy: gvfs.Config{FlushIdle: 300 * time.Millisecond}})
	cs := cacheClient(t, pl.Server.Addr())
	path := filepath.Join(pl.Mountpoint, "disk", "disk.raw")
	got, err := os.ReadFile(filepath.Join(pl.Mountpoint, "golden", "disk.raw"))
	if err != nil || !bytes.Equal(got, golden) {
		t.Fatalf("golden through the view: %v", err)
	}

	ref := bytes.Clone(golden)
	patch := bytes.Repeat([]byte("vmgrid"), 20_000)
	copy(ref[size/2-1000:], patch)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(patch, size/2-1000); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// No flush asked: the idle timer writes the disk back.
	deadline := time.Now().Add(10 * time.Second)
	for !bytes.Equal(serverCopy(t, is.Client, size), ref) {
		if time.Now().After(deadline) {
			t.Fatal("the disk was not written back after --flush-idle")
		}
		time.Sleep(50 * time.Millisecond)
	}
	st, err := cs.GetCacheStats(ctxT(t), &computev1.GetCacheStatsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.DirtyBlocks != 0 || st.FetchedBytes == 0 || st.Upstream != cp.Server.Addr() || st.BlockSize == 0 {
		t.Fatalf("stats after the idle write-back: %v", st)
	}
	fr, err := cs.Flush(ctxT(t), &computev1.FlushRequest{})
	if err != nil || len(fr.Disks) != 0 {
		t.Fatalf("flush with nothing dirty: %v, %v", fr, err)
	}
	dr, err := cs.DropCaches(ctxT(t), &computev1.DropCachesRequest{})
	if err != nil || dr.BlocksDropped == 0 {
		t.Fatalf("drop caches: %v, %v", dr, err)
	}
	got, err = os.ReadFile(path)
	if err != nil || !bytes.Equal(got, ref) {
		t.Fatalf("disk through the view after drop: %v", err)
	}
}
