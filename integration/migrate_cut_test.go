package integration

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"

	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/computeserver/vnet/vnettest"
	"github.com/vmgrid/vmgrid/internal/testutil"
	"github.com/vmgrid/vmgrid/internal/testutil/cutproxy"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// TestMigrateNetworkCut: the network between the plants is cut while the
// guest's RAM is on its way. The source gives up (no byte moved for
// vmm.MigrationStall, or its keepalive finds the destination silent), the
// VM runs on where it was, and the destination, whose source went silent,
// removes what it made once its keepalive gives up on the source.
func TestMigrateNetworkCut(t *testing.T) {
	testutil.NeedQEMU(t)
	vnettest.NeedRoot(t)
	// Restored after the grid's own cleanups (they run last-in, first-out):
	// its servers and clients read these while they run.
	stall, ka := vmm.MigrationStall, services.Keepalive
	t.Cleanup(func() { vmm.MigrationStall, services.Keepalive = stall, ka })
	vmm.MigrationStall = 3 * time.Second
	services.Keepalive = keepalive.ServerParameters{Time: time.Second, Timeout: time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()

	g := startNetGrid(t, ctx, "src")
	ad, err := g.create(ctx, "alice", "cut-1", "")
	if err != nil {
		t.Fatal(err)
	}
	if out, code := g.sh(ctx, ad, "mount -o remount,rw / && echo before-the-cut > /root/mark && sync"); code != 0 {
		t.Fatalf("set up the guest: %s", out)
	}
	// The destination is reached only through the proxy: the shop and
	// the source dial what it registers.
	px := cutproxy.Start(t, "")
	g.advertise = map[string]string{"dst": px.Addr()}
	g.addPlant("dst")
	px.SetTarget(g.plants["dst"].Addr())
	eventually(t, "two plants registered", func() bool { return g.registered(ctx) == 2 })

	vmDir := filepath.Join(g.dirs["dst"], "vms", ad.VmId)
	// cleaned is when the destination had removed what it made: no VM, no
	// directory (its QEMU is stopped before the directory goes).
	cleaned := make(chan time.Duration, 1)
	var cutAt time.Time
	start := time.Now()
	_, phases, err := g.migrateWatching(ctx, "alice", ad.VmId, "dst", func(phase string) {
		if phase == "copying" && cutAt.IsZero() { // RAM is on its way
			cutAt = time.Now()
			px.Cut()
			go func() {
				for ctx.Err() == nil {
					_, gerr := g.plants["dst"].Line.GetVM(ad.VmId)
					if _, serr := os.Stat(vmDir); errdefs.IsNotFound(gerr) && errors.Is(serr, os.ErrNotExist) {
						cleaned <- time.Since(cutAt)
						return
					}
					time.Sleep(50 * time.Millisecond)
				}
			}()
		}
	})
	t.Logf("phases %v; cut %v after the start; the migration failed %v after the cut: %v",
		phases, cutAt.Sub(start).Round(time.Millisecond), time.Since(cutAt).Round(time.Millisecond), err)
	if cutAt.IsZero() {
		t.Fatalf("the migration never copied RAM: %v", err)
	}
	if errdefs.Code(err) != codes.Unavailable {
		t.Fatalf("a migration whose network was cut: %v, want Unavailable", err)
	}
	if took := time.Since(cutAt); took > time.Minute {
		t.Fatalf("the source gave up %v after the cut", took)
	}
	got, err := g.clients["alice"].GetVM(ctx, &shopv1.GetVMRequest{VmId: ad.VmId})
	if err != nil || got.Plant != "src" || got.State != computev1.VMState_VM_STATE_RUNNING {
		t.Fatalf("the VM after the cut: %v, %v", got, err)
	}
	if out, _ := g.sh(ctx, got, "echo 3 > /proc/sys/vm/drop_caches; cat /root/mark"); out != "before-the-cut" {
		t.Fatalf("the guest after the cut: %q", out)
	}
	// The destination hears nothing more from the source: its keepalive
	// gives up on it and it removes the machine it made, whatever the
	// source decides.
	select {
	case d := <-cleaned:
		t.Logf("the destination cleaned up %v after the cut", d.Round(time.Millisecond))
	case <-time.After(30 * time.Second):
		t.Fatalf("the destination still has vm %s (or its directory) 30 s after the source's verdict", ad.VmId)
	}
}
