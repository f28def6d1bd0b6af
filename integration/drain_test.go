package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/vnet/vnettest"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// TestDrain: a plant told to stop (its context ends, as on SIGTERM) with
// a VM running drains: the shop moves the VM live to the other plant, its
// disk (a file written before) and memory (its uptime) along, and the
// plant exits as soon as it is empty, well before its drain timeout. The
// last plant, told to stop, has nowhere to send it: it exits without
// waiting out its timeout, and the VM is listed LOST.
func TestDrain(t *testing.T) {
	testutil.NeedQEMU(t)
	vnettest.NeedRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g := startNetGrid(t, ctx)
	const timeout = 2 * time.Minute
	g.drain = timeout
	g.addPlant("da")
	g.addPlant("db")
	eventually(t, "two plants registered", func() bool { return g.registered(ctx) == 2 })
	ad, err := g.create(ctx, "alice", "drained", "drain")
	if err != nil {
		t.Fatal(err)
	}
	out, code := g.sh(ctx, ad, "mount -o remount,rw / && echo written-before > /root/before && sync && cat /proc/uptime")
	if code != 0 {
		t.Fatalf("set up the guest: exit %d: %s", code, out)
	}
	up0, t0 := guestUptime(t, out), time.Now()
	other := "da"
	if ad.Plant == "da" {
		other = "db"
	}

	start := time.Now()
	g.stops[ad.Plant]() // returns when the plant has exited
	took := time.Since(start)
	t.Logf("plant %s drained and exited in %v", ad.Plant, took)
	if took >= timeout {
		t.Fatalf("the plant exited after %v, its drain timeout: it did not drain", took)
	}
	eventually(t, "the drained plant left the registry", func() bool { return g.registered(ctx) == 1 })
	got, err := g.clients["alice"].GetVM(ctx, &shopv1.GetVMRequest{VmId: ad.VmId})
	if err != nil || got.Plant != other || got.State != computev1.VMState_VM_STATE_RUNNING || got.MigratedFrom != ad.Plant {
		t.Fatalf("the VM after its plant drained: %v, %v; want RUNNING on %s, migrated from %s", got, err, other, ad.Plant)
	}
	out, _ = g.sh(ctx, got, "echo 3 > /proc/sys/vm/drop_caches; cat /root/before; cat /proc/uptime")
	lines := strings.Split(out, "\n")
	if len(lines) != 2 || lines[0] != "written-before" {
		t.Fatalf("the guest after the drain: %q", out)
	}
	if up1, wall := guestUptime(t, lines[1]), time.Since(t0).Seconds(); up1 < up0+wall*0.9 {
		t.Errorf("uptime %.1f s after %.1f s, was %.1f s: the guest did not keep counting", up1, wall, up0)
	}

	start = time.Now()
	g.stops[other]()
	if took := time.Since(start); took >= timeout {
		t.Fatalf("the last plant waited out its drain timeout (%v) with nowhere to go", took)
	}
	eventually(t, "the VM of the last plant listed LOST", func() bool {
		got, err := g.clients["alice"].GetVM(ctx, &shopv1.GetVMRequest{VmId: ad.VmId})
		return err == nil && got.State == computev1.VMState_VM_STATE_LOST
	})
}
