package shop

import (
	"context"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

// movingPlant migrates its VMs to the fake plants of peers (by name), as a
// plant's MigrateVM does: the VM leaves here and runs there.
type movingPlant struct {
	*fakePlant
	peers map[string]*fakePlant
}

func (p *movingPlant) MigrateVM(req *computev1.MigrateVMRequest, stream computev1.PlantService_MigrateVMServer) error {
	dest := p.peers[req.Destination.Plant]
	if dest == nil || !p.has(req.VmId) {
		return status.Error(codes.NotFound, "no such vm or destination")
	}
	p.mu.Lock()
	delete(p.vms, req.VmId)
	p.mu.Unlock()
	dest.mu.Lock()
	dest.vms[req.VmId] = true
	dest.mu.Unlock()
	return stream.Send(&computev1.MigrateVMProgress{Phase: "running", Classad: &computev1.ClassAd{VmId: req.VmId, Plant: dest.name,
		State: computev1.VMState_VM_STATE_RUNNING, MigratedFrom: p.name}})
}

func (p *movingPlant) DrainPlant(context.Context, *computev1.DrainPlantRequest) (*computev1.DrainPlantResponse, error) {
	p.draining.Store(true)
	p.mu.Lock()
	defer p.mu.Unlock()
	return &computev1.DrainPlantResponse{Vms: uint32(len(p.vms))}, nil
}

func newMovingPlant(name string, peers map[string]*fakePlant) *fakePlant {
	p := &fakePlant{name: name, vms: map[string]bool{}}
	p.srv = &movingPlant{fakePlant: p, peers: peers}
	peers[name] = p
	return p
}

// shopVM is the VM's classad as the shop answers GetVM.
func shopVM(t *testing.T, ts *testShop, id string) *computev1.ClassAd {
	t.Helper()
	ad, err := ts.client.GetVM(context.Background(), &shopv1.GetVMRequest{VmId: id})
	if err != nil {
		t.Fatal(err)
	}
	return ad
}

// A draining plant's VM moves to another plant, once, by one shop; a VM
// whose claim another shop holds is left to it; with no other plant the VM
// stays, and is lost when its plant leaves; a draining plant wins no
// auction.
func TestDrainMigratesOffDrainingPlants(t *testing.T) {
	te := startTestEtcd(t)
	ts := startTestShop(t, te, Config{})
	other := startTestShop(t, te, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sum := func(result string) float64 {
		var n float64
		for _, s := range []*testShop{ts, other} {
			var m dto.Metric
			if err := s.shop.metrics.drains.WithLabelValues(result).Write(&m); err != nil {
				t.Fatal(err)
			}
			n += m.GetCounter().GetValue()
		}
		return n
	}
	create := func(id string) *computev1.ClassAd {
		ad, err := ts.create(ctx, &shopv1.CreateVMRequest{RequestId: id})
		if err != nil {
			t.Fatal(err)
		}
		return ad
	}
	peers := map[string]*fakePlant{}

	// No other plant: the VM stays RUNNING on its draining plant, and is
	// LOST once the plant has left.
	a := newMovingPlant("plant-a", peers)
	pa := runPlant(t, te, a, "", 1)
	stays := create("stays")
	a.draining.Store(true)
	eventually(t, 10*time.Second, "a drain attempt finding no room", func() bool { return sum(drainNoRoom) >= 1 })
	if ad := shopVM(t, ts, stays.VmId); ad.Plant != "plant-a" || ad.State != computev1.VMState_VM_STATE_RUNNING {
		t.Fatalf("with no other plant the VM is %s on %s, want RUNNING on plant-a", ad.State, ad.Plant)
	}
	pa.leave()
	eventually(t, 10*time.Second, "the VM left behind listed LOST", func() bool {
		return shopVM(t, ts, stays.VmId).State == computev1.VMState_VM_STATE_LOST
	})

	// Two VMs on plant-b; another shop holds one's claim (it drives a
	// verb of it) when plant-b drains to plant-c.
	b := newMovingPlant("plant-b", peers)
	runPlant(t, te, b, "", 5)
	moved, held := create("moved"), create("held")
	key := drivingPrefix + held.VmId
	if ok, _, err := other.shop.store.claim(ctx, key); err != nil || !ok {
		t.Fatalf("claim: %v %v", ok, err)
	}
	c := newMovingPlant("plant-c", peers)
	runPlant(t, te, c, "", 5)
	b.draining.Store(true)
	eventually(t, 15*time.Second, "the VM migrated to plant-c", func() bool { return shopVM(t, ts, moved.VmId).Plant == "plant-c" })
	if !c.has(moved.VmId) || b.has(moved.VmId) {
		t.Fatal("the migrated VM is not on plant-c alone")
	}
	if ad := create("new"); ad.Plant != "plant-c" {
		t.Fatalf("a new VM went to %s, not to the one plant that is not draining", ad.Plant)
	}
	time.Sleep(2 * drainInterval) // passes that find the held VM busy
	if ad := shopVM(t, ts, held.VmId); ad.Plant != "plant-b" {
		t.Fatalf("the VM whose claim another shop holds moved to %s", ad.Plant)
	}
	other.shop.store.release(key)
	eventually(t, 15*time.Second, "the released VM migrated", func() bool { return shopVM(t, ts, held.VmId).Plant == "plant-c" })
	if ad := shopVM(t, ts, held.VmId); ad.State != computev1.VMState_VM_STATE_RUNNING {
		t.Fatalf("the migrated VM is %s", ad.State)
	}
	time.Sleep(2 * drainInterval) // no shop moves a VM twice
	if got := sum(drainMigrated); got != 2 {
		t.Fatalf("the shops counted %v drain migrations, want 2 (each VM moved once)", got)
	}
}

// An operator drains a plant through the shop (an owner may not): its VM
// moves to the other plant, also when a shop that died mid-migration left
// its record MIGRATING.
func TestDrainPlantRPC(t *testing.T) {
	te := startTestEtcd(t)
	ts := startTestShop(t, te, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	peers := map[string]*fakePlant{}
	a := newMovingPlant("plant-a", peers)
	runPlant(t, te, a, "", 5)
	ad, err := ts.create(ctx, &shopv1.CreateVMRequest{RequestId: "one"})
	if err != nil {
		t.Fatal(err)
	}
	b := newMovingPlant("plant-b", peers)
	runPlant(t, te, b, "", 5)
	eventually(t, 5*time.Second, "plant-b registered", func() bool { _, ok := ts.shop.market.Plant("plant-b"); return ok })

	r, _, err := ts.shop.store.vm(ctx, ad.VmId)
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.shop.vms.setState(ctx, r, computev1.VMState_VM_STATE_MIGRATING); err != nil {
		t.Fatal(err)
	}
	_, err = ts.client.DrainPlant(ctx, &shopv1.DrainPlantRequest{Plant: "plant-a"})
	if codeOf(err) != codes.PermissionDenied {
		t.Fatalf("an owner's DrainPlant: %v, want PermissionDenied", err)
	}
	cc, err := services.Dial(ts.addr, services.TLSFiles{}, grpc.WithPerRPCCredentials(auth.Credentials{Token: operatorToken, Insecure: true}))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ops := shopv1.NewShopServiceClient(cc)
	for req, want := range map[string]codes.Code{"": codes.InvalidArgument, "../x": codes.InvalidArgument, "no-such-plant": codes.NotFound} {
		if _, err := ops.DrainPlant(ctx, &shopv1.DrainPlantRequest{Plant: req}); codeOf(err) != want {
			t.Errorf("DrainPlant %q: %v, want %v", req, err, want)
		}
	}
	resp, err := ops.DrainPlant(ctx, &shopv1.DrainPlantRequest{Plant: "plant-a"})
	if err != nil || resp.Vms != 1 {
		t.Fatalf("DrainPlant: %v, %v; want 1 VM", resp, err)
	}
	eventually(t, 10*time.Second, "the VM migrated to plant-b", func() bool { return shopVM(t, ts, ad.VmId).Plant == "plant-b" })
	if got := shopVM(t, ts, ad.VmId); got.State != computev1.VMState_VM_STATE_RUNNING {
		t.Fatalf("the VM is %s on plant-b", got.State)
	}
	if p, _ := ts.shop.market.Plant("plant-a"); !p.Draining {
		t.Fatal("the registry does not say plant-a is draining")
	}
}
