//go:build compose

package compose

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

const (
	lost    = computev1.VMState_VM_STATE_LOST
	running = computev1.VMState_VM_STATE_RUNNING
)

func requestID(prefix string) string {
	b := make([]byte, 4)
	rand.Read(b) //nolint:errcheck
	return prefix + "-" + hex.EncodeToString(b)
}

func state(ctx context.Context, c shopv1.ShopServiceClient, vm string) computev1.VMState {
	ad, err := c.GetVM(ctx, &shopv1.GetVMRequest{VmId: vm})
	if err != nil {
		return computev1.VMState_VM_STATE_UNSPECIFIED
	}
	return ad.GetState()
}

// A plant killed: the shop lists its VMs as LOST within seconds (never
// RUNNING), and places the next VM on another plant.
func TestPlantKilled(t *testing.T) {
	settle(t)
	ctx := context.Background()
	c := g.shop(t, 1)
	var ads []*computev1.ClassAd
	for i := range 3 {
		ad, err := create(ctx, c, requestID(fmt.Sprintf("kill%d", i)))
		if err != nil {
			t.Fatal(err)
		}
		ads = append(ads, ad)
	}
	victim := ads[0].GetPlant()
	if _, err := docker("kill", g.plantContainer(t, victim)); err != nil {
		t.Fatal(err)
	}
	took := eventually(t, 20*time.Second, "the killed plant's VMs LOST", func() bool {
		for _, ad := range ads {
			s := state(ctx, c, ad.GetVmId())
			if ad.GetPlant() == victim && s != lost {
				return false
			}
			if ad.GetPlant() != victim && s != running {
				t.Fatalf("%s on %s: %s, want RUNNING", ad.GetVmId(), ad.GetPlant(), s)
			}
		}
		return true
	})
	t.Logf("plant %s killed: its VMs LOST after %s", victim, took.Round(time.Millisecond))
	ad, err := create(ctx, c, requestID("afterkill"))
	if err != nil {
		t.Fatal(err)
	}
	if ad.GetPlant() == victim {
		t.Fatalf("a new VM was placed on the killed plant %s", victim)
	}
	t.Logf("the next VM went to %s", ad.GetPlant())
}

// etcd loses one member: creates keep working; two: the shop answers
// Unavailable at once, and works again by itself when they are back.
func TestEtcdQuorum(t *testing.T) {
	settle(t)
	ctx := context.Background()
	c := g.shop(t, 1)
	member := func(n int) string { return fmt.Sprintf("%s_etcd%d_1", g.project, n) }
	t.Cleanup(func() { docker("start", member(2), member(3)) }) //nolint:errcheck // before settle's cleanup
	if _, err := docker("stop", member(3)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := create(ctx, c, requestID("etcd2of3")); err != nil {
		t.Fatalf("create with 2 of 3 etcd members: %v", err)
	}
	t.Logf("create with 2 of 3 etcd members: %s", time.Since(start).Round(time.Millisecond))
	if _, err := docker("stop", member(2)); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	_, err := create(ctx, c, requestID("etcd1of3"))
	took := time.Since(start)
	if status.Code(err) != codes.Unavailable || took > 10*time.Second {
		t.Fatalf("create with 1 of 3 etcd members: %v after %s, want Unavailable within 10s", err, took)
	}
	t.Logf("create with 1 of 3 etcd members: Unavailable after %s: %v", took.Round(time.Millisecond), err)
	if _, err := docker("start", member(2), member(3)); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	var ad *computev1.ClassAd
	eventually(t, 90*time.Second, "a create after etcd's quorum is back", func() bool {
		ad, err = create(ctx, c, requestID("etcdback"))
		return err == nil
	})
	t.Logf("etcd members back: a create succeeded %s later (on %s)", time.Since(back).Round(time.Millisecond), ad.GetPlant())
}

// A plant cut off the network for 30 s: its VM is LOST meanwhile (never
// RUNNING), and once it is back the plant registers again by itself and
// the VM is RUNNING again.
func TestPlantPartition(t *testing.T) {
	settle(t)
	ctx := context.Background()
	c := g.shop(t, 1)
	ad, err := create(ctx, c, requestID("partition"))
	if err != nil {
		t.Fatal(err)
	}
	name := g.plantContainer(t, ad.GetPlant())
	network, aliases := networkOf(t, name)
	if _, err := docker("network", "disconnect", network, name); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	reconnect := func() {
		args := []string{"network", "connect"}
		for _, a := range aliases {
			args = append(args, "--alias", a)
		}
		docker(append(args, network, name)...) //nolint:errcheck // an error: already connected
	}
	t.Cleanup(reconnect)
	took := eventually(t, 20*time.Second, "the cut-off plant's VM LOST", func() bool {
		s := state(ctx, c, ad.GetVmId())
		if s != lost && s != running {
			t.Fatalf("%s: %s while its plant is cut off", ad.GetVmId(), s)
		}
		return s == lost
	})
	t.Logf("plant %s cut off: its VM LOST after %s", ad.GetPlant(), took.Round(time.Millisecond))
	for time.Since(cut) < 30*time.Second {
		if s := state(ctx, c, ad.GetVmId()); s != lost {
			t.Fatalf("%s: %s while its plant is cut off, want LOST", ad.GetVmId(), s)
		}
		time.Sleep(time.Second)
	}
	reconnect()
	took = eventually(t, 60*time.Second, "the plant back and its VM RUNNING", func() bool {
		return state(ctx, c, ad.GetVmId()) == running
	})
	t.Logf("plant back on the network: registered again and its VM RUNNING after %s", took.Round(time.Millisecond))
}

// networkOf is the compose network of a container and its aliases there.
func networkOf(t *testing.T, name string) (string, []string) {
	out, err := docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", name)
	if err != nil {
		t.Fatal(err)
	}
	var nets map[string]struct{ Aliases []string }
	if err := json.Unmarshal([]byte(out), &nets); err != nil {
		t.Fatal(err)
	}
	for n, v := range nets {
		return n, v.Aliases
	}
	t.Fatalf("%s is on no network", name)
	return "", nil
}

// A shop killed mid-create: the retry with the same request id on the
// other shop returns one VM.
func TestShopKilledMidCreate(t *testing.T) {
	settle(t)
	ctx := context.Background()
	c1, c2 := g.shop(t, 1), g.shop(t, 2)
	id := requestID("shopkill")
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c1.CreateVM(sctx, &shopv1.CreateVMRequest{RequestId: id})
	if err != nil {
		t.Fatal(err)
	}
	for {
		p, err := st.Recv()
		if err != nil {
			t.Fatalf("before the shop was killed: %v", err)
		}
		if strings.Contains(p.GetMessage(), "won") {
			break // the winning plant is creating it now
		}
	}
	shop1 := g.project + "_shop_1"
	if _, err := docker("kill", shop1); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { docker("start", shop1) }) //nolint:errcheck // before settle's cleanup
	var ad *computev1.ClassAd
	start := time.Now()
	eventually(t, 60*time.Second, "the retry on the other shop returns a running VM", func() bool {
		ad, err = create(ctx, c2, id)
		if err != nil {
			t.Logf("retry: %v", err)
		}
		return err == nil && ad.GetState() == running
	})
	t.Logf("retry on the other shop: %s on %s after %s", ad.GetVmId(), ad.GetPlant(), time.Since(start).Round(time.Millisecond))
	l, err := c2.ListVMs(ctx, &shopv1.ListVMsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(l.GetVms()) != 1 || l.GetVms()[0].GetVmId() != ad.GetVmId() {
		var ids []string
		for _, v := range l.GetVms() {
			ids = append(ids, v.GetVmId()+"@"+v.GetPlant()+":"+v.GetState().String())
		}
		t.Fatalf("VMs after the retry: %v, want only %s", ids, ad.GetVmId())
	}
}
