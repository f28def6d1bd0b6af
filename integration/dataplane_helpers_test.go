package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services"
)

// The data plane end to end: the real vmgrid binary, built once per run,
// spawned as image server, cache proxy and compute servers on 127.0.0.1
// ports picked by the kernel (read back from each process's "serving" log
// line). Processes are stopped, and FUSE mounts they leave unmounted, when
// the test ends; their logs are printed only when it fails.

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// vmgridBin builds ./cmd/vmgrid once per test binary into a fixed place
// under the temporary directory (rebuilt, incrementally, at every run).
func vmgridBin(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the data plane tests mount FUSE file systems and need root")
	}
	buildOnce.Do(func() {
		dir := filepath.Join(os.TempDir(), "vmgrid-integration-bin")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "vmgrid")
		cmd := exec.Command("go", "build", "-o", binPath, "./cmd/vmgrid")
		cmd.Dir = ".." // the module root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/vmgrid: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// proc is a running vmgrid process.
type proc struct {
	t       *testing.T
	name    string
	args    []string
	cmd     *exec.Cmd
	log     *syncBuffer
	exited  chan struct{}
	waitErr error
	Addr    string // gRPC address
	Metrics string // /metrics address, if any
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// spawn starts `vmgrid args...` and waits until it serves. It is stopped
// with SIGTERM (SIGKILL after 20 s) when the test ends.
func spawn(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: name, args: args, log: &syncBuffer{}}
	p.start()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("%s log:\n%s", p.name, p.log.String())
		}
	})
	return p
}

func (p *proc) start() {
	p.t.Helper()
	p.exited = make(chan struct{})
	p.cmd = exec.Command(vmgridBin(p.t), append([]string{"--log-level", "debug"}, p.args...)...)
	pr, pw := io.Pipe()
	p.cmd.Stdout = p.log
	p.cmd.Stderr = io.MultiWriter(p.log, pw)
	if err := p.cmd.Start(); err != nil {
		p.t.Fatalf("start %s: %v", p.name, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		pw.Close()
		close(p.exited)
	}()
	serving := make(chan [2]string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		found := false
		for sc.Scan() {
			if found {
				continue // drain
			}
			var l struct{ Msg, Addr, Metrics string }
			if json.Unmarshal(sc.Bytes(), &l) == nil && l.Msg == "serving" {
				serving <- [2]string{l.Addr, l.Metrics}
				found = true
			}
		}
		io.Copy(io.Discard, pr) //nolint:errcheck
	}()
	select {
	case a := <-serving:
		p.Addr, p.Metrics = a[0], a[1]
	case <-p.exited:
		p.t.Fatalf("%s exited before serving: %v\n%s", p.name, p.waitErr, p.log.String())
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill() //nolint:errcheck
		<-p.exited
		p.t.Fatalf("%s did not start serving in 30 s:\n%s", p.name, p.log.String())
	}
}

// signal sends sig to the process.
func (p *proc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("signal %s: %v", p.name, err)
	}
}

// kill9 kills the process with SIGKILL and waits for it.
func (p *proc) kill9() {
	p.t.Helper()
	p.signal(syscall.SIGKILL)
	<-p.exited
}

// restart starts the process again with the same arguments.
func (p *proc) restart() { p.t.Helper(); p.start() }

// stop ends the process gracefully (SIGTERM) and reports a failed exit.
func (p *proc) stop() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		if p.waitErr != nil {
			p.t.Errorf("%s exited with %v", p.name, p.waitErr)
		}
	case <-time.After(20 * time.Second):
		p.t.Errorf("%s did not stop in 20 s; killing it", p.name)
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// run runs a vmgrid CLI verb to completion and returns its output.
func run(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(vmgridBin(t), args...)
	// Not the contexts of whoever runs the tests (vmgrid up writes one).
	cmd.Env = append(os.Environ(), "VMGRID_CONFIG="+filepath.Join(t.TempDir(), "config.yaml"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("vmgrid %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func startImageServer(t *testing.T) *proc {
	return spawn(t, "imageserver", "imageserver", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir", t.TempDir(),
		"--tokens", testutil.TokensFile(t))
}

func startCacheProxy(t *testing.T, upstream string) *proc {
	return spawn(t, "cacheproxy "+upstream, "cacheproxy", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
		"--upstream", upstream, "--data-dir", t.TempDir(), "--cache-size", "256MiB",
		"--tokens", testutil.TokensFile(t), "--service-token-file", testutil.ServiceTokenFile(t))
}

// computeServer is a spawned compute server and its mount point.
type computeServer struct {
	*proc
	DataDir string
	Mnt     string
}

// startComputeServer starts a compute server on dataDir (a new one when
// empty) that never writes back on its own (--flush-idle=-1s).
func startComputeServer(t *testing.T, upstream, dataDir string) *computeServer {
	t.Helper()
	if dataDir == "" {
		dataDir = t.TempDir()
	}
	mnt := filepath.Join(dataDir, "mnt")
	// Registered before the process's own cleanup, so it runs after it:
	// whatever the process left mounted (a kill -9) is unmounted.
	t.Cleanup(func() {
		for _, m := range []string{mnt, computeserver.MemoryMountpoint(mnt)} {
			if isMounted(m) {
				_ = exec.Command("fusermount3", "-u", "-z", m).Run()
			}
		}
	})
	p := spawn(t, "computeserver "+filepath.Base(dataDir), "computeserver", "--listen", "127.0.0.1:0", "--metrics-listen", "",
		"--upstream", upstream, "--data-dir", dataDir, "--flush-idle=-1s", "--cache-size", "256MiB",
		"--tokens", testutil.TokensFile(t), "--service-token-file", testutil.ServiceTokenFile(t))
	return &computeServer{proc: p, DataDir: dataDir, Mnt: mnt}
}

// isMounted reports whether dir is a mount point.
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

// dial connects to a service as the operator; the connection is closed
// when the test ends.
func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := services.Dial(addr, services.TLSFiles{}, testutil.As(testutil.OperatorToken))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func imageClient(t *testing.T, addr string) *imageclient.Client {
	return imageclient.NewClient(dial(t, addr))
}

func cacheClient(t *testing.T, addr string) computev1.CacheServiceClient {
	return computev1.NewCacheServiceClient(dial(t, addr))
}

// sparseBytes returns size bytes of zeros with n random non-zero regions.
func sparseBytes(rng *rand.Rand, size, n, maxLen int) []byte {
	b := make([]byte, size)
	for range n {
		l := 1 + rng.IntN(maxLen)
		off := rng.IntN(size - l + 1)
		testutil.RandomNonZero(rng, b[off:off+l])
	}
	return b
}

// fetchFile reads a file of an image or disk from a server through the
// whole-file channel.
func fetchFile(t *testing.T, c *imageclient.Client, image, file string, size int) []byte {
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

// publishBytes publishes files given as bytes.
func publishBytes(t *testing.T, c *imageclient.Client, image string, files map[string]file) {
	t.Helper()
	spec := imageclient.PublishSpec{Name: image}
	for name, f := range files {
		spec.Files = append(spec.Files, imageclient.PublishFile{Name: name, Path: writeFile(t, name, f.data), Kind: f.kind})
	}
	publish(t, c, spec)
}

// metric sums the samples of a Prometheus counter (all label values, or
// those whose labels contain filter) on a /metrics endpoint.
func metric(t *testing.T, addr, name, filter string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) || (len(line) > len(name) && line[len(name)] != '{' && line[len(name)] != ' ') {
			continue
		}
		if filter != "" && !strings.Contains(line, filter) {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		sum += v
	}
	return sum
}

func sameContent(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	if len(got) != len(want) {
		t.Fatalf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: byte %d is %#x, want %#x", what, i, got[i], want[i])
		}
	}
}

// waitFor polls cond for up to d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
