package plant

import (
	"context"
	"os"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

func attach(name string, mib uint64) *computev1.Action {
	return &computev1.Action{Id: name, Kind: &computev1.Action_AttachDisk{AttachDisk: &computev1.AttachDiskAction{Name: name, SizeMib: mib}}}
}

// TestDisksBeyondTheHostAreRefused is issue 15 item 10: attach_disk of
// 1 TiB was accepted on a host with 60 GB free. It is refused before
// anything is fetched or created; so is what passes the plant's cap.
func TestDisksBeyondTheHostAreRefused(t *testing.T) {
	dir := testutil.ShortTempDir(t)
	p, err := New(Config{Name: "p1", Dir: dir, MemoryMiB: 1024, DiskMiB: 2048})
	if err != nil {
		t.Fatal(err)
	}
	progress := func(computev1.VMState, string) {}
	for _, c := range []struct {
		mib  uint64
		want string
	}{
		{1 << 20, "free"},   // 1 TiB: more than this host has (and the cap)
		{4096, "for disks"}, // within the host's space, beyond the cap
	} {
		p.cfg.DiskMiB = 0
		if c.want == "for disks" {
			p.cfg.DiskMiB = 2048
		}
		_, err := p.CreateVM(context.Background(), &computev1.CreateVMRequest{VmId: "vm-big", Image: "tiny",
			Config: &computev1.ConfigDAG{Actions: []*computev1.Action{attach("big", c.mib)}}}, progress)
		if errdefs.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("%d MiB: want ResourceExhausted (%q), got %v", c.mib, c.want, err)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("a refused VM left files: %v", ents)
	}
	if len(p.vms) != 0 {
		t.Fatal("a refused VM was registered")
	}
}

// TestPlantsSharingAHostDivideItsMemory is issue 15 item 13: each plant
// took 80% of the host's RAM, so two on one host overcommitted it. The
// default is a value of the configuration a caller divides.
func TestPlantsSharingAHostDivideItsMemory(t *testing.T) {
	def := DefaultConfig().MemoryMiB
	if def == 0 || def != hostMemoryMiB()*8/10 {
		t.Fatalf("DefaultConfig().MemoryMiB = %d, want 80%% of %d MiB", def, hostMemoryMiB())
	}
	var offered uint64
	for _, name := range []string{"a", "b"} {
		cfg := DefaultConfig()
		cfg.Name, cfg.Dir, cfg.MemoryMiB = name, testutil.ShortTempDir(t), def/2
		p, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		offered += p.Offer().MemoryMiB
	}
	if offered > def {
		t.Fatalf("two plants offer %d MiB of a host whose guests may use %d", offered, def)
	}
}
