package gvfs

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

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
)

// The tests mount real FUSE views (root and /dev/fuse are required) of
// proxies over a real image server on 127.0.0.1, and compare everything read
// with reference bytes kept in memory.

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("skipping: the gvfs tests mount FUSE file systems and need root")
		os.Exit(0)
	}
	goleak.VerifyTestMain(m,
		// gRPC's and zstd's process-wide workers.
		goleak.IgnoreTopFunction("google.golang.org/grpc/internal/grpcsync.(*CallbackSerializer).run"),
		goleak.IgnoreAnyFunction("github.com/klauspost/compress/zstd.(*blockDec).startDecoder"),
	)
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// testLogger keeps a proxy's log in memory and prints it if the test fails.
func testLogger(t testing.TB) *zap.Logger {
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

// newProxy opens a proxy over the ImageService at addr with its caches in
// dir (a new temporary directory when empty). It is closed, and its
// upstream connection with it, when the test ends; closing it earlier is
// fine.
func newProxy(t testing.TB, addr, dir string, tweak ...func(*Config)) *Proxy {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	up, err := DialUpstream(addr, services.TLSFiles{}, false)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Upstream:  up,
		Dir:       dir,
		Cache:     CacheConfig{Capacity: 512 << 20, Ways: 8, BlockSize: 64 << 10},
		FlushIdle: -1,
		Logger:    testLogger(t),
	}
	for _, f := range tweak {
		f(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		up.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { closeProxy(t, p) })
	return p
}

// closeProxy closes p (unmounting its views) and its upstream connection.
// It may be called more than once.
func closeProxy(t testing.TB, p *Proxy) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.Close(ctx); err != nil && !strings.Contains(err.Error(), "closed") {
		t.Errorf("close proxy: %v", err)
	}
	p.Upstream().Close()
}

// mount mounts p's view on a new directory and returns it. Proxy.Close
// unmounts it (checked when the test ends; a lazy fusermount3 -u is the
// safety net).
func mount(t testing.TB, p *Proxy) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "mnt")
	if _, err := Mount(dir, p, MountOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		closeProxy(t, p)
		if isMounted(dir) {
			t.Errorf("%s is still mounted after the proxy closed", dir)
			_ = exec.Command("fusermount3", "-u", "-z", dir).Run()
		}
	})
	return dir
}

// isMounted reports whether dir is a mount point (per /proc/self/mounts).
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

// goldenFile is one file to publish: its bytes are the reference.
type goldenFile struct {
	name   string
	kind   imagev1.FileKind
	policy imagev1.TransferPolicy
	bs     uint32
	data   []byte
}

// publish writes the files to disk (zero runs as holes, as a real image
// would have them) and publishes them as one image.
func publish(t testing.TB, c *imageclient.Client, image string, files ...goldenFile) *imagev1.Manifest {
	t.Helper()
	dir := t.TempDir()
	spec := imageclient.PublishSpec{Name: image}
	for _, f := range files {
		path := filepath.Join(dir, f.name)
		writeSparse(t, path, f.data)
		spec.Files = append(spec.Files, imageclient.PublishFile{Name: f.name, Path: path, Kind: f.kind, Policy: f.policy, BlockSize: f.bs})
	}
	if _, err := c.Publish(ctxT(t), spec, nil); err != nil {
		t.Fatalf("publish %s: %v", image, err)
	}
	resp, err := c.API.GetImage(ctxT(t), &imagev1.GetImageRequest{Name: image, View: imagev1.View_VIEW_FULL})
	if err != nil {
		t.Fatal(err)
	}
	return resp.Manifest
}

// writeSparse writes b to path leaving 4 KiB pages of zeros as holes.
func writeSparse(t testing.TB, path string, b []byte) {
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

// sparseData returns size bytes of zeros with n regions of random non-zero
// bytes of up to maxLen each.
func sparseData(rng *rand.Rand, size, n, maxLen int) []byte {
	b := make([]byte, size)
	for range n {
		l := 1 + rng.IntN(maxLen)
		off := rng.IntN(size - l + 1)
		testutil.RandomNonZero(rng, b[off:off+l])
	}
	return b
}

// diskImage publishes a golden image with one disk file and creates a
// persistent disk from it.
func diskImage(t testing.TB, c *imageclient.Client, golden, disk string, data []byte) {
	t.Helper()
	publish(t, c, golden, goldenFile{name: "disk.raw", kind: imagev1.FileKind_FILE_KIND_DISK, data: data})
	if _, err := c.API.CreateDisk(ctxT(t), &imagev1.CreateDiskRequest{Name: disk, SourceImage: golden}); err != nil {
		t.Fatal(err)
	}
}

// fetchAll reads a file of an image through the whole-file channel.
func fetchAll(t testing.TB, c *imageclient.Client, image, file string, size int) []byte {
	t.Helper()
	out := make([]byte, size)
	err := c.FetchFile(ctxT(t), image, file, 0, 0, func(off uint64, n uint32, data []byte) error {
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

// readVia reads [off, off+n) of a file through the proxy API.
func readVia(t testing.TB, p *Proxy, image, file string, off int64, n int) []byte {
	t.Helper()
	f, err := p.Open(ctxT(t), image, file)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, n)
	got, err := f.ReadAt(ctxT(t), b, off)
	if err != nil {
		t.Fatalf("read %s/%s at %d: %v", image, file, off, err)
	}
	return b[:got]
}

// firstDiff describes where two byte slices first differ.
func firstDiff(got, want []byte) string {
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

func sameBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: %s", what, firstDiff(got, want))
	}
}

func createDisk(name, source string) *imagev1.CreateDiskRequest {
	return &imagev1.CreateDiskRequest{Name: name, SourceImage: source}
}

// waitComplete waits until the file cache holds a whole-file-policy file:
// its last bytes are served as soon as they arrive, and the file is checked
// against its SHA-256 and published in the cache just after.
func waitComplete(t testing.TB, p *Proxy, image, file string) {
	t.Helper()
	f, err := p.Open(ctxT(t), image, file)
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
