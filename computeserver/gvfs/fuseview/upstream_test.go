package fuseview_test

import (
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/gvfs/internal/gvfstest"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/imageserver"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
)

// serveStore serves the image store in dir on addr again (an image server
// restarted on its address); it stops when the test ends.
func serveStore(t *testing.T, dir, addr string) {
	t.Helper()
	store, err := imageserver.OpenStore(dir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	srv, err := services.NewServer(services.Options{Name: "imageserver", Listen: addr, ShutdownTimeout: 5 * time.Second},
		func(gs *grpc.Server, reg prometheus.Registerer) error {
			svc, err := imageserver.NewService(store, zap.NewNop(), reg)
			if err == nil {
				svc.Register(gs)
			}
			return err
		})
	if err != nil {
		t.Fatal(err)
	}
	gvfstest.Serve(t, srv)
}

// upstreamFixture is an image with a block-policy and a whole-file file,
// viewed through a proxy that has their manifest but none of their bytes.
type upstreamFixture struct {
	srv       *testutil.Server
	mnt       string
	disk, mem []byte
}

func newUpstreamFixture(t *testing.T, retry time.Duration) *upstreamFixture {
	rng := rand.New(rand.NewPCG(15, 6))
	fx := &upstreamFixture{srv: testutil.StartServer(t, ""), disk: make([]byte, 4<<20)}
	testutil.RandomData(rng, fx.disk)
	fx.mem = testutil.MemoryLike(rng, 2<<20, 0.2, 0.3)
	gvfstest.Publish(t, fx.srv.Client, "img",
		gvfstest.GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: fx.disk},
		gvfstest.GoldenFile{Name: "mem.state", Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, Policy: imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE, Data: fx.mem})
	p := gvfstest.NewProxy(t, fx.srv.Srv.Addr(), "", func(c *gvfs.Config) { c.UpstreamRetry = retry })
	fx.mnt = gvfstest.Mount(t, p)
	for _, name := range []string{"disk.raw", "mem.state"} {
		if _, err := os.Stat(filepath.Join(fx.mnt, "img", name)); err != nil {
			t.Fatal(err)
		}
	}
	return fx
}

// readBoth reads both files through the view, in parallel.
func (fx *upstreamFixture) readBoth() (disk, mem []byte, err error) {
	type res struct {
		b   []byte
		err error
	}
	ch := make(chan res, 1)
	go func() {
		b, err := os.ReadFile(filepath.Join(fx.mnt, "img", "mem.state"))
		ch <- res{b, err}
	}()
	disk, err = os.ReadFile(filepath.Join(fx.mnt, "img", "disk.raw"))
	r := <-ch
	return disk, r.b, errors.Join(err, r.err)
}

// TestUpstreamRestartWithinRetry: the image server is stopped before a
// guest reads and comes back on its address 2 s later; the reads wait for
// it and return the right bytes (they failed with EIO at once before).
func TestUpstreamRestartWithinRetry(t *testing.T) {
	fx := newUpstreamFixture(t, time.Minute)
	addr, dir := fx.srv.Srv.Addr(), fx.srv.Dir
	fx.srv.Stop()
	go func() {
		time.Sleep(2 * time.Second)
		serveStore(t, dir, addr)
	}()
	start := time.Now()
	disk, mem, err := fx.readBoth()
	if err != nil {
		t.Fatalf("reads across an image server restart: %v", err)
	}
	gvfstest.SameBytes(t, "disk.raw", disk, fx.disk)
	gvfstest.SameBytes(t, "mem.state", mem, fx.mem)
	if took := time.Since(start); took < time.Second {
		t.Fatalf("the reads took %s: the image server was not away", took)
	}
}

// TestUpstreamGoneBeyondRetry: an image server that stays away makes reads
// fail with EIO once Config.UpstreamRetry has passed, not before, and not
// much later.
func TestUpstreamGoneBeyondRetry(t *testing.T) {
	const retry = 2 * time.Second
	fx := newUpstreamFixture(t, retry)
	fx.srv.Stop()
	start := time.Now()
	_, _, err := fx.readBoth()
	took := time.Since(start)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("reads with the image server gone: %v, want EIO", err)
	}
	if took < retry || took > retry+5*time.Second {
		t.Fatalf("reads failed after %s, want a little over %s", took, retry)
	}
}
