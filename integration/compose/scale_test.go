//go:build compose

package compose

import (
	"context"
	"testing"
	"time"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// Scaling down while VMs run: the plant compose stops drains first — the
// shops live-migrate its VMs to the plants that stay (docker-compose waits,
// within the plants' stop_grace_period) — so every VM ends RUNNING, none on
// the removed plant, and its VMs say they migrated from it; with one shop
// left, it still answers for every VM; a plant added later takes VMs.
func TestScaleDownWhileVMsRun(t *testing.T) {
	settle(t)
	ctx := context.Background()
	c := g.shop(t, 1) // compose removes the highest-numbered shop: 1 stays
	// A VM on every plant (the auction spreads them; a few more if it did
	// not), so the plant removed has one to drain.
	before := g.containers(t, "plant")
	var ads []*computev1.ClassAd
	on := map[string]bool{}
	for len(ads) < 3 || len(on) < len(before) && len(ads) < 6 {
		ad, err := create(ctx, c, requestID("scale"))
		if err != nil {
			t.Fatal(err)
		}
		ads = append(ads, ad)
		on[ad.GetPlant()] = true
	}
	if _, err := g.compose("up", "-d", "--no-recreate", "--scale", "plant=2", "--scale", "shop=1"); err != nil {
		t.Fatal(err)
	}
	after := g.containers(t, "plant")
	gone := ""
	for name, host := range before {
		if _, ok := after[name]; !ok {
			gone = "plant-" + host
		}
	}
	if gone == "" || len(after) != 2 {
		t.Fatalf("plants before %v, after %v", before, after)
	}
	moved := 0
	took := eventually(t, 15*time.Second, "every VM RUNNING off the removed plant, its own migrated from it", func() bool {
		moved = 0
		for _, ad := range ads {
			got, err := c.GetVM(ctx, &shopv1.GetVMRequest{VmId: ad.GetVmId()})
			if err != nil || got.GetState() != running || got.GetPlant() == gone {
				return false
			}
			if ad.GetPlant() == gone {
				if got.GetMigratedFrom() != gone {
					return false
				}
				moved++
			}
		}
		return true
	})
	if moved == 0 {
		t.Fatalf("no VM was on the removed plant %s (VMs on %v): nothing drained", gone, on)
	}
	t.Logf("scaled to 2 plants and 1 shop: %d VMs of %s migrated off it as it drained, every VM RUNNING %s after compose returned",
		moved, gone, took.Round(time.Millisecond))
	l, err := c.ListVMs(ctx, &shopv1.ListVMsRequest{})
	if err != nil || len(l.GetVms()) != len(ads) {
		t.Fatalf("the shop left lists %d VMs (%v), want %d", len(l.GetVms()), err, len(ads))
	}
	if _, err := g.compose("up", "-d", "--no-recreate", "--scale", "plant=3", "--scale", "shop=2"); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Minute, "a VM on the plant added", func() bool {
		ad, err := create(ctx, c, requestID("scaleup"))
		if err != nil {
			t.Fatal(err)
		}
		old := false
		for _, host := range before {
			old = old || "plant-"+host == ad.GetPlant()
		}
		return !old
	})
}
