package plant_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// publishBlank publishes an imported-style image whose disk boots nothing.
func publishBlank(t *testing.T, ctx context.Context, cl *imageclient.Client, name string, kind imagev1.GuestAgent) {
	t.Helper()
	dir := t.TempDir()
	cfg, _ := json.Marshal(plant.FirmwareConfig(1, 256, kind))
	if err := os.WriteFile(filepath.Join(dir, plant.ConfigFile), cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, plant.RootFile), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(dir, plant.RootFile), 16<<20); err != nil {
		t.Fatal(err)
	}
	_, err := cl.Publish(ctx, imageclient.PublishSpec{Name: name, Attributes: &imagev1.ImageAttributes{
		Arch: "x86_64", Vcpus: 1, MemoryMib: 256, Boot: imagev1.Boot_BOOT_FIRMWARE, GuestAgent: kind,
	}, Files: []imageclient.PublishFile{
		{Name: plant.ConfigFile, Path: filepath.Join(dir, plant.ConfigFile), Kind: imagev1.FileKind_FILE_KIND_CONFIG},
		{Name: plant.RootFile, Path: filepath.Join(dir, plant.RootFile), Kind: imagev1.FileKind_FILE_KIND_DISK},
	}}, nil)
	if err != nil {
		t.Fatal(err)
	}
}

// A stock guest that never becomes configurable fails the creation within
// the plant's guest timeout, with the console in the error, and leaves
// nothing behind; what cloud-init cannot do is refused before a boot.
func TestStockGuestNeverConfigured(t *testing.T) {
	testutil.NeedQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	is := testutil.StartServer(t, "")
	publishBlank(t, ctx, is.Client, "blank-qga", imagev1.GuestAgent_GUEST_AGENT_QEMU_GA)
	publishBlank(t, ctx, is.Client, "blank-ci", imagev1.GuestAgent_GUEST_AGENT_CLOUD_INIT)
	cs := startCompute(t, is.Srv.Addr(), func(c *computeserver.Config) { c.GuestTimeout = 8 * time.Second })

	for _, image := range []string{"blank-qga", "blank-ci"} {
		start := time.Now()
		_, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{Image: image, Owner: "alice",
			Config: host("", &computev1.Action{Id: "name", Kind: &computev1.Action_SetHostname{SetHostname: &computev1.SetHostnameAction{Hostname: "x"}}})})
		if code(err) != codes.Unavailable || !strings.Contains(err.Error(), "within 8s") || !strings.Contains(err.Error(), "guest console") {
			t.Fatalf("%s: a guest that never answers: %v", image, err)
		}
		if took := time.Since(start); took > 40*time.Second {
			t.Fatalf("%s: failed after %s, the timeout is 8s", image, took)
		}
		if vms, _ := os.ReadDir(filepath.Join(cs.dir, "vms")); len(vms) != 0 {
			t.Fatalf("%s: left behind: %v", image, vms)
		}
	}
	_, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{Image: "blank-ci", Owner: "alice",
		Config: host("", &computev1.Action{Id: "m", Kind: &computev1.Action_Mount{Mount: &computev1.MountAction{Device: "/dev/vdb", Path: "/mnt"}}})})
	if code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "cloud-init") {
		t.Fatalf("a mount through cloud-init: %v", err)
	}
}
