// Package gvfstest holds what the tests of gvfs, its FUSE view and its
// cache proxy share: a proxy over a real image server, a mounted view, and
// images published from reference bytes kept in memory.
package gvfstest

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/gvfs/fuseview"
	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
)

// Main runs a package's tests: they mount real FUSE views (root and
// /dev/fuse are required) of proxies over a real image server on 127.0.0.1,
// and compare everything read with reference bytes kept in memory.
func Main(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("skipping: the gvfs tests Mount FUSE file systems and need root")
		os.Exit(0)
	}
	goleak.VerifyTestMain(m,
		// gRPC's and zstd's process-wide workers.
		goleak.IgnoreTopFunction("google.golang.org/grpc/internal/grpcsync.(*CallbackSerializer).run"),
		goleak.IgnoreAnyFunction("github.com/klauspost/compress/zstd.(*blockDec).startDecoder"),
	)
}

func Ctx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// Logger keeps a proxy's log in memory and prints it if the test fails.
func Logger(t testing.TB) *zap.Logger {
	buf := &lockedBuf{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("proxy log:\n%s", buf.String())
		}
	})
	return zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(zap.NewDevelopmentEncoderConfig()), zapcore.AddSync(buf), zap.InfoLevel))
}

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// NewProxy opens a proxy over the ImageService at addr with its caches in
// dir (a new temporary directory when empty). It is closed, and its
// upstream connection with it, when the test ends; closing it earlier is
// fine.
func NewProxy(t testing.TB, addr, dir string, tweak ...func(*gvfs.Config)) *gvfs.Proxy {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	up, err := gvfs.DialUpstream(addr, services.TLSFiles{}, false)
	if err != nil {
		t.Fatal(err)
	}
	cfg := gvfs.Config{
		Upstream:  up,
		Dir:       dir,
		Cache:     gvfs.CacheConfig{Capacity: 512 << 20, Ways: 8, BlockSize: 64 << 10},
		FlushIdle: -1,
		Logger:    Logger(t),
	}
	for _, f := range tweak {
		f(&cfg)
	}
	p, err := gvfs.New(cfg)
	if err != nil {
		up.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { CloseProxy(t, p) })
	return p
}

// Serve serves srv until the test ends; its cleanup stops the server, so
// register it after the cleanups of what the server uses (they run later).
func Serve(t testing.TB, srv *services.Server) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("serve %s: %v", srv.Addr(), err)
		}
	})
}

// CloseProxy closes p (unmounting its views) and its upstream connection.
// It may be called more than once.
func CloseProxy(t testing.TB, p *gvfs.Proxy) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.Close(ctx); err != nil && !strings.Contains(err.Error(), "closed") {
		t.Errorf("close proxy: %v", err)
	}
	p.Upstream().Close()
}

// Mount mounts p's view on a new directory and returns it. Proxy.Close
// unmounts it (checked when the test ends; a lazy fusermount3 -u is the
// safety net).
func Mount(t testing.TB, p *gvfs.Proxy) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "mnt")
	if _, err := fuseview.Mount(dir, p, fuseview.MountOptions{Logger: Logger(t)}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		CloseProxy(t, p)
		if IsMounted(dir) {
			t.Errorf("%s is still mounted after the proxy closed", dir)
			_ = exec.Command("fusermount3", "-u", "-z", dir).Run()
		}
	})
	return dir
}

// IsMounted reports whether dir is a mount point (per /proc/self/mounts).
func IsMounted(dir string) bool {
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

// GoldenFile is one file to publish: its bytes are the reference.
type GoldenFile struct {
	Name   string
	Kind   imagev1.FileKind
	Policy imagev1.TransferPolicy
	BS     uint32
	Data   []byte
}

// Publish writes the files to disk (zero runs as holes, as a real image
// would have them) and publishes them as one image.
func Publish(t testing.TB, c *imageclient.Client, image string, files ...GoldenFile) *imagev1.Manifest {
	t.Helper()
	dir := t.TempDir()
	spec := imageclient.PublishSpec{Name: image}
	for _, f := range files {
		path := filepath.Join(dir, f.Name)
		WriteSparse(t, path, f.Data)
		spec.Files = append(spec.Files, imageclient.PublishFile{Name: f.Name, Path: path, Kind: f.Kind, Policy: f.Policy, BlockSize: f.BS})
	}
	if _, err := c.Publish(Ctx(t), spec, nil); err != nil {
		t.Fatalf("Publish %s: %v", image, err)
	}
	resp, err := c.API.GetImage(Ctx(t), &imagev1.GetImageRequest{Name: image, View: imagev1.View_VIEW_FULL})
	if err != nil {
		t.Fatal(err)
	}
	return resp.Manifest
}

// WriteSparse writes b to path leaving 4 KiB pages of zeros as holes.
func WriteSparse(t testing.TB, path string, b []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(len(b))); err != nil {
		t.Fatal(err)
	}
	const page = 4096
	for off := 0; off < len(b); off += page {
		p := b[off:min(off+page, len(b))]
		if blockproto.IsZero(p) {
			continue
		}
		if _, err := f.WriteAt(p, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
}

// SparseData returns size bytes of zeros with n regions of random non-zero
// bytes of up to maxLen each.
func SparseData(rng *rand.Rand, size, n, maxLen int) []byte {
	b := make([]byte, size)
	for range n {
		l := 1 + rng.IntN(maxLen)
		off := rng.IntN(size - l + 1)
		testutil.RandomNonZero(rng, b[off:off+l])
	}
	return b
}

// DiskImage publishes a golden image with one disk file and creates a
// persistent disk from it.
func DiskImage(t testing.TB, c *imageclient.Client, golden, disk string, data []byte) {
	t.Helper()
	Publish(t, c, golden, GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: data})
	if _, err := c.API.CreateDisk(Ctx(t), &imagev1.CreateDiskRequest{Name: disk, SourceImage: golden}); err != nil {
		t.Fatal(err)
	}
}

// FetchAll reads a file of an image through the whole-file channel.
func FetchAll(t testing.TB, c *imageclient.Client, image, file string, size int) []byte {
	t.Helper()
	out := make([]byte, size)
	err := c.FetchFile(Ctx(t), image, file, 0, 0, func(off uint64, n uint32, data []byte) error {
		if data != nil {
			copy(out[off:], data)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("fetch %s/%s: %v", image, file, err)
	}
	return out
}

// ReadVia reads [off, off+n) of a file through the proxy API.
func ReadVia(t testing.TB, p *gvfs.Proxy, image, file string, off int64, n int) []byte {
	t.Helper()
	f, err := p.Open(Ctx(t), image, file)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, n)
	got, err := f.ReadAt(Ctx(t), b, off)
	if err != nil {
		t.Fatalf("read %s/%s at %d: %v", image, file, off, err)
	}
	return b[:got]
}

// FirstDiff describes where two byte slices first differ.
func FirstDiff(got, want []byte) string {
	if bytes.Equal(got, want) { // fast (not instrumented by -race)
		return "equal"
	}
	if len(got) != len(want) {
		return fmt.Sprintf("length %d, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("byte %d is %#x, want %#x", i, got[i], want[i])
		}
	}
	return "equal"
}

func SameBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: %s", what, FirstDiff(got, want))
	}
}

func CreateDisk(name, source string) *imagev1.CreateDiskRequest {
	return &imagev1.CreateDiskRequest{Name: name, SourceImage: source}
}

// WaitComplete waits until the file cache holds a whole-file-policy file:
// its last bytes are served as soon as they arrive, and the file is checked
// against its SHA-256 and published in the cache just after.
func WaitComplete(t testing.TB, p *gvfs.Proxy, image, file string) {
	t.Helper()
	f, err := p.Open(Ctx(t), image, file)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !p.FileCache().Complete(f.Meta()) {
		if time.Now().After(deadline) {
			t.Fatalf("the file cache does not hold %s/%s after it was read", image, file)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
