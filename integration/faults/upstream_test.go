//go:build faults

package faults

import (
	"context"
	"fmt"
	"testing"
	"time"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

// The upstream gone during a cold clone: a new plant (cold caches, in no
// market) clones "tiny" and the image server is killed when the plant
// starts restoring the memory state through its view (the bulk of a
// clone's reads).

// upstreamBack: the image server returns within the plant's
// --upstream-retry, and the clone completes.
func (g *grid) upstreamBack(t *testing.T) {
	p := g.startPlant("cold-back", g.images.addr, false, 30*time.Second)
	start := time.Now()
	ad, err := g.coldClone(t, p, "up-back", 2*time.Second)
	if err != nil {
		t.Fatalf("a clone whose upstream came back within --upstream-retry: %v", err)
	}
	t.Logf("clone with the upstream away for 2 s: %v in %v", ad.GetState(), time.Since(start).Round(100*time.Millisecond))
	if ad.GetState() != computev1.VMState_VM_STATE_RUNNING {
		t.Errorf("state %v, want RUNNING", ad.GetState())
	}
	g.destroyOnPlant(t, p, ad.GetVmId())
	survived(t)
}

// upstreamGone: the image server stays away; the creation fails within a
// bound with an error, and no QEMU of it is left.
func (g *grid) upstreamGone(t *testing.T) {
	p := g.startPlant("cold-gone", g.images.addr, false, 3*time.Second)
	start := time.Now()
	ad, err := g.coldClone(t, p, "up-gone", 0)
	took := time.Since(start)
	t.Logf("clone with the upstream gone: %v after %v", err, took.Round(100*time.Millisecond))
	if err == nil {
		t.Errorf("the clone succeeded with its upstream gone (%v): was it warm?", ad.GetState())
		g.destroyOnPlant(t, p, ad.GetVmId())
	}
	if took > 60*time.Second {
		t.Errorf("the failure took %v, want at most 60 s", took)
	}
	waitFor(t, 10*time.Second, "the QEMU of the failed clone to go", func() bool { return len(qemusUnder(p.spec.DataDir)) == 0 })
	g.images.restart()
	survived(t)
}

// coldClone asks plant p for a VM of "tiny", kills the image server when
// the restore starts and, when back > 0, starts it again after back.
func (g *grid) coldClone(t *testing.T, p *plant, id string, back time.Duration) (*computev1.ClassAd, error) {
	t.Helper()
	c := computev1.NewPlantServiceClient(g.dial(p.addr, serviceToken))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := c.CreateVM(ctx, &computev1.CreateVMRequest{VmId: id, Owner: "demo", Image: "tiny"})
	if err != nil {
		return nil, err
	}
	killed := false
	restarted := make(chan struct{})
	if back <= 0 {
		close(restarted)
	}
	// The image server is back before the next test, whatever happened.
	defer func() { <-restarted }()
	for {
		m, err := st.Recv()
		if err != nil {
			return nil, err
		}
		if !killed && m.GetState() == computev1.VMState_VM_STATE_RESTORING {
			killed = true
			g.images.kill9()
			if back > 0 {
				go func() { defer close(restarted); time.Sleep(back); g.images.restart() }()
			}
		}
		if m.GetClassad() != nil {
			if m.GetClassad().GetState() == computev1.VMState_VM_STATE_FAILED {
				return m.GetClassad(), fmt.Errorf("failed: %s", m.GetClassad().GetError())
			}
			return m.GetClassad(), nil
		}
	}
}

func (g *grid) destroyOnPlant(t *testing.T, p *plant, vm string) {
	c := computev1.NewPlantServiceClient(g.dial(p.addr, serviceToken))
	if _, err := c.DestroyVM(context.Background(), &computev1.DestroyVMRequest{VmId: vm}); err != nil {
		t.Errorf("destroy %s: %v", vm, err)
	}
}
