package plant

import (
	"context"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// A draining plant takes no new VMs and says so in its offer; its drain
// ends at once when it is empty or only VMs that cannot move are left,
// and waits (bounded) for a VM still being made, which may move once it
// runs.
func TestDrainRefusesNewVMsAndWaitsOnlyForWhatCanMove(t *testing.T) {
	p, err := New(Config{Name: "p1", Dir: testutil.ShortTempDir(t), MemoryMiB: 1024})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if left := p.Drain(ctx); left != nil || !p.Offer().Draining || !p.Draining() {
		t.Fatalf("an empty plant's drain: left %v, draining %v", left, p.Offer().Draining)
	}
	ad := &computev1.ClassAd{VmId: "vm-new", Owner: "alice", Hardware: &computev1.Hardware{MemoryMib: 256}}
	if _, _, err := p.claim(ad.VmId, ad, 0); !errdefs.IsUnavailable(err) {
		t.Fatalf("a new VM on a draining plant: %v, want Unavailable", err)
	}

	// VMs registered before the drain: one made but not running (it
	// cannot move), one still being made.
	p.mu.Lock()
	p.draining = false
	p.mu.Unlock()
	done, _, err := p.claim("vm-done", &computev1.ClassAd{VmId: "vm-done", Hardware: &computev1.Hardware{}}, 0)
	if err != nil {
		t.Fatal(err)
	}
	close(done.ready)
	start := time.Now()
	if left := p.Drain(ctx); len(left) != 1 || left[0] != "vm-done" || time.Since(start) > time.Second {
		t.Fatalf("with only a VM that cannot move: left %v after %v", left, time.Since(start))
	}
	p.mu.Lock()
	p.draining = false
	p.mu.Unlock()
	if _, _, err = p.claim("vm-making", &computev1.ClassAd{VmId: "vm-making", Hardware: &computev1.Hardware{}}, 0); err != nil {
		t.Fatal(err)
	}
	short, stop := context.WithTimeout(ctx, 3*drainPoll)
	defer stop()
	if left := p.Drain(short); len(left) != 2 || short.Err() == nil {
		t.Fatalf("with a VM still being made the drain ended early (left %v)", left)
	}
}
