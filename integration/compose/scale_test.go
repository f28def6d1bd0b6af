//go:build compose

package compose

import (
	"context"
	"testing"
	"time"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// Scaling down while VMs run: the plant compose stops leaves the registry
// at once, so its VM is LOST (never RUNNING) and the others' stay RUNNING;
// with one shop left, it still answers for every VM; a plant added later
// takes VMs.
func TestScaleDownWhileVMsRun(t *testing.T) {
	settle(t)
	ctx := context.Background()
	c := g.shop(t, 1) // compose removes the highest-numbered shop: 1 stays
	var ads []*computev1.ClassAd
	for range 3 {
		ad, err := create(ctx, c, requestID("scale"))
		if err != nil {
			t.Fatal(err)
		}
		ads = append(ads, ad)
	}
	before := g.containers(t, "plant")
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
	took := eventually(t, 15*time.Second, "the removed plant's VMs LOST, the others RUNNING", func() bool {
		for _, ad := range ads {
			want := running
			if ad.GetPlant() == gone {
				want = lost
			}
			if state(ctx, c, ad.GetVmId()) != want {
				return false
			}
		}
		return true
	})
	t.Logf("scaled to 2 plants and 1 shop: %s's VMs LOST after %s, the others RUNNING", gone, took.Round(time.Millisecond))
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
