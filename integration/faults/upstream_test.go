//go:build faults

package faults

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

// The upstream gone during a cold clone: a new plant (cold caches, in no
// market) clones "tiny" and the image server is killed when the plant
// starts reading the image (FETCHING: its manifest and configuration) or
// starts restoring the memory state through its view (RESTORING: the bulk
// of a clone's reads).

// upstreamBack: the image server returns within the plant's
// --upstream-retry, and the clone completes.
func (g *grid) upstreamBack(at computev1.VMState) func(t *testing.T) {
	return func(t *testing.T) { g.upstreamBackAt(t, at) }
}

func (g *grid) upstreamBackAt(t *testing.T, at computev1.VMState) {
	name := "cold-back-" + strings.ToLower(strings.TrimPrefix(at.String(), "VM_STATE_"))
	p := g.startPlant(name, g.images.addr, false, 30*time.Second)
	start := time.Now()
	ad, err := g.coldClone(t, p, "up-back", at, 2*time.Second)
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

// upstreamGone: the image server goes away with everything of the image
// but its memory state on the plant, and stays away; the restore fails
// with Unavailable soon after the plant's --upstream-retry (the console's
// tail in the message), and no QEMU of it is left. (Killed at RESTORING
// instead, the image server may go after the plant has prefetched the
// whole memory state, and the clone then succeeds.)
func (g *grid) upstreamGone(t *testing.T) {
	const retry, margin = 3 * time.Second, 7 * time.Second
	p := g.startPlant("cold-gone", g.images.addr, false, retry)
	warmAllButMemory(t, p, "tiny")
	g.images.kill9()
	start := time.Now()
	ad, err := g.coldClone(t, p, "up-gone", computev1.VMState_VM_STATE_UNSPECIFIED, 0)
	took := time.Since(start)
	t.Logf("clone with the upstream gone: %v after %v", err, took.Round(100*time.Millisecond))
	if err == nil {
		t.Errorf("the clone succeeded with its upstream gone (%v): was it warm?", ad.GetState())
		g.destroyOnPlant(t, p, ad.GetVmId())
	} else if code := status.Code(err); code != codes.Unavailable {
		t.Errorf("the failure's code is %v, want Unavailable", code)
	}
	if took > retry+margin {
		t.Errorf("the failure took %v, want at most %v (--upstream-retry %v)", took, retry+margin, retry)
	}
	waitFor(t, 10*time.Second, "the QEMU of the failed clone to go", func() bool { return len(qemusUnder(p.spec.DataDir)) == 0 })
	g.images.restart()
	survived(t)
}

// warmAllButMemory reads through plant p's view what a restore of image
// needs before the memory state: its configuration and kernels (the
// plant's manifest cache holds the image).
func warmAllButMemory(t *testing.T, p *plant, image string) {
	t.Helper()
	dir := filepath.Join(p.mnt, image)
	b, err := os.ReadFile(filepath.Join(dir, "vm.json"))
	if err != nil {
		t.Fatalf("read vm.json through %s's view: %v", p.name, err)
	}
	var cfg struct {
		Kernel       string `json:"kernel"`
		Initrd       string `json:"initrd"`
		ResumeKernel string `json:"resume_kernel"`
		Memory       string `json:"memory"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil || cfg.Memory == "" {
		t.Fatalf("vm.json of %s: %v (memory state %q)", image, err, cfg.Memory)
	}
	for _, f := range []string{cfg.Kernel, cfg.Initrd, cfg.ResumeKernel} {
		if f == "" {
			continue
		}
		if _, err := os.ReadFile(filepath.Join(dir, f)); err != nil {
			t.Fatalf("read %s through %s's view: %v", f, p.name, err)
		}
	}
}

// coldClone asks plant p for a VM of "tiny", kills the image server when
// the plant reports state at (UNSPECIFIED: never) and, when back > 0,
// starts it again after back.
func (g *grid) coldClone(t *testing.T, p *plant, id string, at computev1.VMState, back time.Duration) (*computev1.ClassAd, error) {
	t.Helper()
	c := computev1.NewPlantServiceClient(g.dial(p.addr, serviceToken))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := c.CreateVM(ctx, &computev1.CreateVMRequest{VmId: id, Owner: "demo", Image: "tiny"})
	if err != nil {
		return nil, err
	}
	killed := at == computev1.VMState_VM_STATE_UNSPECIFIED
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
		if !killed && m.GetState() == at {
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
