package plant_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// silentHook boots to a shell that never starts the agent, and says so on
// the console: the error must carry those lines.
const silentHook = "echo 'vmgrid-test: this guest has no agent'\nwhile :; do sleep 3600; done\n"

// TestGuestThatNeverAnswers: a golden build and a clone whose guest never
// answers fail within their configured bound, with the console's last
// lines in the error, leaving no machine, no files and no image behind.
func TestGuestThatNeverAnswers(t *testing.T) {
	testutil.NeedQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	is := testutil.StartServer(t, "")

	t.Run("golden build", func(t *testing.T) {
		work := testutil.ShortTempDir(t)
		start := time.Now()
		_, err := plant.BuildGolden(ctx, plant.GoldenOptions{
			Name: "silent", WorkDir: work, Driver: &vmm.QEMU{}, Publish: is.Client, Logger: zaptest.NewLogger(t),
			Recipe: &imagebuild.Tiny{Hook: silentHook}, AgentTimeout: 20 * time.Second,
		})
		took := time.Since(start)
		// The console's tail is in the error; how far the guest got in 20 s
		// (its hook's "this guest has no agent", or still the kernel's
		// lines) depends on the host's load.
		if err == nil || errdefs.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "guest console") {
			t.Fatalf("err = %v", err)
		}
		if took > 90*time.Second {
			t.Fatalf("failed after %s with a 20 s bound", took)
		}
		t.Logf("failed after %s: %.200s…", took.Round(time.Millisecond), err)
		if _, err := is.Client.API.GetImage(ctx, &imagev1.GetImageRequest{Name: "silent"}); !errdefs.IsNotFound(err) {
			t.Fatalf("an image was published: %v", err)
		}
		if pids := qemuUsing(t, work); len(pids) != 0 {
			t.Fatalf("QEMU still running: %v", pids)
		}
	})

	t.Run("clone", func(t *testing.T) {
		publishColdSilent(t, ctx, is.Client)
		cs := startCompute(t, is.Srv.Addr(), func(c *computeserver.Config) { c.AgentTimeout = 20 * time.Second })
		start := time.Now()
		_, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{VmId: "silent1", Image: "silent-cold"})
		took := time.Since(start)
		if err == nil || errdefs.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "guest console") {
			t.Fatalf("err = %v", err)
		}
		if took > 90*time.Second {
			t.Fatalf("failed after %s with a 20 s bound", took)
		}
		t.Logf("failed after %s", took.Round(time.Millisecond))
		if pids := qemuUsing(t, cs.dir); len(pids) != 0 {
			t.Fatalf("QEMU still running: %v", pids)
		}
		if ents, _ := os.ReadDir(filepath.Join(cs.dir, "vms")); len(ents) != 0 {
			t.Fatalf("left in the plant's directory: %v", ents)
		}
	})
}

// publishColdSilent publishes a tiny image without a memory state whose
// guest boots but never answers (a clone cold-boots it).
func publishColdSilent(t *testing.T, ctx context.Context, cl *imageclient.Client) {
	t.Helper()
	dir := testutil.ShortTempDir(t)
	img, err := (&imagebuild.Tiny{Hook: silentHook}).Build(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg := plant.VMConfig{Version: 1, Kernel: plant.KernelFile, Initrd: plant.InitrdFile, Root: plant.RootFile,
		Spec: vmm.Spec{MemoryMiB: 256, Append: img.Cmdline, Disks: []vmm.Disk{{Format: vmm.QCOW2, Interface: vmm.Virtio}},
			Channels: []vmm.Channel{{Name: plant.AgentChannel}}}}
	b, _ := json.Marshal(cfg)
	vmJSON := filepath.Join(dir, plant.ConfigFile)
	if err := os.WriteFile(vmJSON, b, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = cl.Publish(ctx, imageclient.PublishSpec{Name: "silent-cold", Attributes: &imagev1.ImageAttributes{Arch: "x86_64", Vcpus: 1, MemoryMib: 256}, Files: []imageclient.PublishFile{
		{Name: plant.ConfigFile, Path: vmJSON, Kind: imagev1.FileKind_FILE_KIND_CONFIG},
		{Name: plant.KernelFile, Path: img.Kernel, Kind: imagev1.FileKind_FILE_KIND_KERNEL},
		{Name: plant.InitrdFile, Path: img.Initrd, Kind: imagev1.FileKind_FILE_KIND_INITRD},
		{Name: plant.RootFile, Path: img.RootDisk, Kind: imagev1.FileKind_FILE_KIND_DISK},
	}}, nil)
	if err != nil {
		t.Fatal(err)
	}
}

// qemuUsing lists QEMU processes whose command line mentions dir.
func qemuUsing(t *testing.T, dir string) []string {
	t.Helper()
	var pids []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			continue
		}
		cmd := string(b)
		if strings.Contains(cmd, "qemu-system") && strings.Contains(cmd, dir) {
			pids = append(pids, filepath.Base(filepath.Dir(p)))
		}
	}
	return pids
}
