package plant_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/imageserver"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
)

// publishGolden builds the tiny golden image with actions and publishes
// it as name on is (through the returned connection).
func publishGolden(t *testing.T, ctx context.Context, is *imageServer, name string, actions ...*computev1.Action) (*grpc.ClientConn, *plant.Golden) {
	t.Helper()
	cc, err := services.Dial(is.addr, services.TLSFiles{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	g, err := plant.BuildGolden(ctx, plant.GoldenOptions{
		Name: name, WorkDir: testutil.ShortTempDir(t), Driver: &vmm.QEMU{}, Publish: imageclient.NewClient(cc), Logger: zaptest.NewLogger(t),
		Recipe:  &imagebuild.Tiny{Hook: plant.GoldenHook, ExtraFiles: map[string]string{"/sbin/vmgrid-agent": testutil.GuestAgent(t)}},
		Actions: actions,
	})
	if err != nil {
		t.Fatal(err)
	}
	return cc, g
}

// imageServer is an image server that can be stopped and started again on
// its address (its store stays).
type imageServer struct {
	t    *testing.T
	dir  string
	addr string
	stop func()
}

func startImages(t *testing.T) *imageServer {
	s := &imageServer{t: t, dir: t.TempDir(), addr: "127.0.0.1:0"}
	s.start()
	t.Cleanup(func() { s.stop() })
	return s
}

func (s *imageServer) start() {
	s.t.Helper()
	store, err := imageserver.OpenStore(s.dir, zap.NewNop())
	if err != nil {
		s.t.Fatal(err)
	}
	srv, err := services.NewServer(services.Options{Name: "imageserver", Listen: s.addr, ShutdownTimeout: 5 * time.Second},
		func(gs *grpc.Server, reg prometheus.Registerer) error {
			svc, err := imageserver.NewService(store, zap.NewNop(), reg)
			if err == nil {
				svc.Register(gs)
			}
			return err
		})
	if err != nil {
		s.t.Fatal(err)
	}
	s.addr = srv.Addr()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx); close(done) }()
	s.stop = func() { cancel(); <-done; s.stop = func() {} }
}

// memFiles are files in the golden guest's tmpfs, written before the
// suspend with their checksums: only the RAM file holds them.
var memFiles = []struct {
	name string
	mib  int
}{{"/tmp/m1", 4}, {"/tmp/m2", 12}, {"/tmp/m3", 12}}

func memAction() *computev1.Action {
	var script []string
	for _, f := range memFiles {
		script = append(script, fmt.Sprintf("dd if=/dev/urandom of=%s bs=1M count=%d 2>/dev/null && sha256sum %s > %s.sum", f.name, f.mib, f.name, f.name))
	}
	return &computev1.Action{Id: "memfiles", Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"sh", "-c", strings.Join(script, " && ")}}}}
}

// checkMem compares a memory file's checksum in the guest with the one
// written before the suspend.
func checkMem(t *testing.T, ctx context.Context, c computev1.PlantServiceClient, id, file string) {
	t.Helper()
	out := exec1(t, ctx, c, id, fmt.Sprintf("sha256sum %s; cat %s.sum", file, file))
	lines := strings.Split(out, "\n")
	if len(lines) != 2 || lines[0] != lines[1] {
		t.Fatalf("%s in the clone's memory is not what the golden guest wrote:\n%s", file, out)
	}
}

// TestLazyMemory builds a golden image whose RAM is a file and restores
// clones from it lazily: memory intact, pages through the cache, the image
// server away during hydration and after it, two clones sharing the
// golden's pages.
func TestLazyMemory(t *testing.T) {
	testutil.NeedQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	is := startImages(t)
	cc, g := publishGolden(t, ctx, is, "lazy", memAction())
	if g.Config.RAM != plant.RAMFile {
		t.Fatalf("the golden image has no RAM file: %+v", g.Config)
	}
	st, err := os.Stat(g.Dir + "/" + plant.MemoryFile)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("golden built in %v; memory state without RAM: %d bytes", g.Took, st.Size())
	if st.Size() > 8<<20 {
		t.Fatalf("the memory state is %d bytes: RAM is still in it", st.Size())
	}

	cs := startCompute(t, is.addr, func(c *computeserver.Config) {
		c.MemoryRestore, c.HydrateAfter = "lazy", 6*time.Second
	})
	st0 := snapshot(cs.Proxy)
	ad, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{VmId: "lazy-1", Image: "lazy"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("lazy clone ready in %s, fetched %d bytes", time.Duration(ad.ReadyNanos), ad.FetchedBytes)
	if ad.MemoryRestore != "lazy" || ad.MemoryBytes != 256<<20 {
		t.Fatalf("classad: memory_restore %q, memory_bytes %d", ad.MemoryRestore, ad.MemoryBytes)
	}

	t.Run("memory intact, pages through the cache", func(t *testing.T) {
		checkMem(t, ctx, cs.plants, ad.VmId, memFiles[0].name)
		d := snapshot(cs.Proxy).minus(st0)
		if d.demand == 0 || d.fetched == 0 || d.misses == 0 {
			t.Fatalf("the clone's pages did not come through the block cache: %+v", d)
		}
		t.Logf("through the cache: %+v", d)
	})

	// The first clone stores its recording 2 s after it is ready.
	profiled := waitProfile(t, ctx, imageclient.NewClient(cc), "lazy")
	t.Run("image server away before hydration ends: the guest waits, then runs on", func(t *testing.T) {
		is.stop()
		got, err := cs.plants.GetVM(ctx, &computev1.GetVMRequest{VmId: ad.VmId})
		if err != nil {
			t.Fatal(err)
		}
		if got.MemoryLocalBytes >= got.MemoryBytes || got.HydratedNanos != 0 {
			t.Fatalf("hydrated before the image server went: %d of %d local", got.MemoryLocalBytes, got.MemoryBytes)
		}
		back := make(chan struct{})
		go func() {
			time.Sleep(3 * time.Second)
			is.start()
			close(back)
		}()
		// m2's pages were never touched since the restore: reading it
		// faults them in while the image server is away.
		checkMem(t, ctx, cs.plants, ad.VmId, memFiles[1].name)
		<-back
		if gone(ad.Pid) {
			t.Fatal("QEMU died")
		}
	})

	t.Run("hydrated, then the image server gone: the guest runs on", func(t *testing.T) {
		var hydrated *computev1.ClassAd
		for hydrated == nil {
			got, err := cs.plants.GetVM(ctx, &computev1.GetVMRequest{VmId: ad.VmId})
			if err != nil {
				t.Fatal(err)
			}
			if got.HydratedNanos > 0 {
				hydrated = got
			} else if ctx.Err() != nil {
				t.Fatal("never hydrated")
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Logf("hydrated %s after ready (%d of %d bytes local)", time.Duration(hydrated.HydratedNanos), hydrated.MemoryLocalBytes, hydrated.MemoryBytes)
		if hydrated.MemoryLocalBytes != hydrated.MemoryBytes {
			t.Fatalf("hydrated with %d of %d bytes local", hydrated.MemoryLocalBytes, hydrated.MemoryBytes)
		}
		is.stop()
		defer is.start()
		checkMem(t, ctx, cs.plants, ad.VmId, memFiles[2].name)
		exec1(t, ctx, cs.plants, ad.VmId, "ls /bin /sbin /usr/bin > /dev/null && echo 3 > /proc/sys/vm/drop_caches && ls -R / > /dev/null 2>&1; true")
	})

	t.Run("profile recorded, stored, and fetched first by a cold clone", func(t *testing.T) {
		t.Logf("profile: %d blocks", profiled)
		// auto: an image with a profile restores lazily.
		cold := startCompute(t, is.addr, func(c *computeserver.Config) { c.MemoryRestore = "auto" })
		ad3, _, err := create(ctx, cold.plants, &computev1.CreateVMRequest{VmId: "lazy-3", Image: "lazy"})
		if err != nil {
			t.Fatal(err)
		}
		if ad3.MemoryRestore != "lazy" {
			t.Fatalf("--memory-restore auto restored a clone of an image with a profile %s", ad3.MemoryRestore)
		}
		checkMem(t, ctx, cold.plants, ad3.VmId, memFiles[0].name)
		if c, ok := cold.Proxy.FirstRequestClass("lazy", plant.RAMFile); !ok || c != gvfs.Prefetch {
			t.Fatalf("the cold clone's first request for its RAM file was %v (asked: %v), want prefetch", c, ok)
		}
		s := cold.Proxy.Stats()
		t.Logf("cold clone with profile ready in %s, fetched %d bytes; profile blocks fetched %d, used %d (so far), missed %d; demand requests %d, prefetch requests %d",
			time.Duration(ad3.ReadyNanos), ad3.FetchedBytes, s.ProfileFetched.Load(), s.ProfileUsed.Load(), s.ProfileMissed.Load(),
			s.ClassRequests[gvfs.Demand].Load(), s.ClassRequests[gvfs.Prefetch].Load())
		if s.ProfileFetched.Load() == 0 || s.ProfileUsed.Load() == 0 {
			t.Fatal("the profile's blocks were not fetched, or none was used")
		}
		cold.stop()
	})

	t.Run("auto without a profile streams the RAM file", func(t *testing.T) {
		if _, err := imageclient.NewClient(cc).API.PutProfile(ctx, &imagev1.PutProfileRequest{Image: "lazy"}); err != nil {
			t.Fatal(err)
		}
		// Hydration would wait 10 minutes: only the stream makes the RAM
		// file local.
		auto := startCompute(t, is.addr, func(c *computeserver.Config) { c.MemoryRestore, c.HydrateAfter = "auto", 10*time.Minute })
		ad4, _, err := create(ctx, auto.plants, &computev1.CreateVMRequest{VmId: "lazy-4", Image: "lazy"})
		if err != nil {
			t.Fatal(err)
		}
		if ad4.MemoryRestore != "lazy" {
			t.Fatalf("auto restored a clone of an image without a profile %s", ad4.MemoryRestore)
		}
		checkMem(t, ctx, auto.plants, ad4.VmId, memFiles[2].name)
		for {
			got, err := auto.plants.GetVM(ctx, &computev1.GetVMRequest{VmId: ad4.VmId})
			if err != nil {
				t.Fatal(err)
			}
			if got.MemoryLocalBytes == got.MemoryBytes {
				t.Logf("ready in %s; the RAM file streamed (%d bytes local)", time.Duration(ad4.ReadyNanos), got.MemoryLocalBytes)
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("the RAM file never became local (%d of %d bytes)", got.MemoryLocalBytes, got.MemoryBytes)
			}
			time.Sleep(200 * time.Millisecond)
		}
		auto.stop()
	})

	t.Run("two clones share the golden's pages", func(t *testing.T) {
		ad2, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{VmId: "lazy-2", Image: "lazy"})
		if err != nil {
			t.Fatal(err)
		}
		checkMem(t, ctx, cs.plants, ad2.VmId, memFiles[0].name)
		for _, pid := range []int32{ad.Pid, ad2.Pid} {
			shared, err := ramShared(int(pid))
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("QEMU %d: %d KiB of the RAM file's pages shared", pid, shared)
			if shared == 0 {
				t.Fatalf("QEMU %d shares none of the golden RAM file's pages", pid)
			}
		}
	})
}

func waitProfile(t *testing.T, ctx context.Context, c *imageclient.Client, image string) int {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		resp, err := c.API.GetProfile(ctx, &imagev1.GetProfileRequest{Image: image})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Entries) > 0 {
			return len(resp.Entries)
		}
		if time.Now().After(deadline) {
			t.Fatal("the first clone stored no working-set profile")
		}
	}
}

// ramShared is the Shared_Clean of a QEMU's mapping of the RAM file, in KiB.
func ramShared(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return 0, err
	}
	in, total := false, 0
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 5 && strings.Contains(f[0], "-") {
			in = strings.HasSuffix(line, "/"+plant.RAMFile)
			continue
		}
		if in && len(f) >= 2 && f[0] == "Shared_Clean:" {
			n, _ := strconv.Atoi(f[1])
			total += n
		}
	}
	return total, nil
}

type proxyStats struct{ demand, fetched, misses uint64 }

func snapshot(p *gvfs.Proxy) proxyStats {
	s := p.Stats()
	return proxyStats{s.ClassRequests[gvfs.Demand].Load(), s.FetchedBlocks.Load(), s.Misses.Load()}
}

func (a proxyStats) minus(b proxyStats) proxyStats {
	return proxyStats{a.demand - b.demand, a.fetched - b.fetched, a.misses - b.misses}
}

// cachedBytes is how much of an image file the proxy's block cache holds.
func cachedBytes(t *testing.T, ctx context.Context, p *gvfs.Proxy, image, file string) uint64 {
	t.Helper()
	f, err := p.Open(ctx, image, file)
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	bs := uint64(f.Meta().BlockSize)
	for idx := uint64(0); idx*bs < f.Size(); idx++ {
		if f.Cached(idx) {
			n += min(bs, f.Size()-idx*bs)
		}
	}
	return n
}
