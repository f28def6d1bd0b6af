//go:build faults

package faults

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// etcd stopped (kill -9) for a while and started again on its directory
// and ports: during the outage the shop answers within a bound, with
// Unavailable when it cannot do without etcd; afterwards creations work
// again with nothing restarted, and a request cut off by the outage is
// answered when retried with its request id.

// outageBound is how long any call may take while etcd is away.
const outageBound = 15 * time.Second

func (g *grid) etcdOutages(t *testing.T) {
	outages := []time.Duration{2 * time.Second, 10 * time.Second, 60 * time.Second}
	if os.Getenv("VMGRID_FAULTS_SHORT") == "1" {
		outages = outages[:2] // for a quick local run
	}
	for _, d := range outages {
		t.Run(d.String(), func(t *testing.T) { g.etcdOutage(t, d) })
	}
}

func (g *grid) etcdOutage(t *testing.T, d time.Duration) {
	c := g.shopClient(ownerToken)
	id := fmt.Sprintf("etcd-outage-%v", d)
	g.etcd.kill9()
	down := time.Now()

	// A CLI call and a creation during the outage.
	ctx, cancel := context.WithTimeout(context.Background(), outageBound+5*time.Second)
	start := time.Now()
	out, err := g.cli(ctx, "vm", "ls", "--shop", g.shop.addr)
	took := time.Since(start)
	cancel()
	t.Logf("vm ls during the outage: %v after %v: %s", err, took.Round(100*time.Millisecond), firstLine(out))
	if took > outageBound {
		t.Errorf("vm ls took %v during the outage, want at most %v", took, outageBound)
	}
	if err != nil && !strings.Contains(strings.ToLower(out), "unavailable") {
		t.Errorf("vm ls failed during the outage without saying Unavailable: %s", out)
	}
	ctx, cancel = context.WithTimeout(context.Background(), outageBound+5*time.Second)
	start = time.Now()
	_, cerr := createVM(ctx, c, tinyVM(id))
	took = time.Since(start)
	cancel()
	t.Logf("CreateVM during the outage: %v after %v", cerr, took.Round(100*time.Millisecond))
	if took > outageBound {
		t.Errorf("CreateVM took %v during the outage, want at most %v", took, outageBound)
	}
	if cerr != nil && status.Code(cerr) != codes.Unavailable && !errdefs.IsUnavailable(cerr) {
		t.Errorf("CreateVM during the outage: %v, want Unavailable", cerr)
	}
	if d >= 10*time.Second && (err == nil || cerr == nil) {
		t.Errorf("calls that need etcd succeeded %v into an outage", time.Since(down))
	}

	time.Sleep(time.Until(down.Add(d)))
	g.etcd.restart()
	back := time.Now()
	g.afterOutage(t, c, id)
	t.Logf("etcd down %v: creations work again %v after it returned", d, time.Since(back).Round(100*time.Millisecond))
	survived(t)
}

// afterOutage: the request cut off is answered when retried, a new one
// works, and both VMs are destroyed.
func (g *grid) afterOutage(t *testing.T, c shopv1.ShopServiceClient, id string) {
	g.waitPlants(2, 30*time.Second)
	var vms []string
	for _, rid := range []string{id, id + "-after"} {
		var ad interface{ GetVmId() string }
		var err error
		deadline := time.Now().Add(30 * time.Second)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			ad, err = createVM(ctx, c, tinyVM(rid))
			cancel()
			if err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		if err != nil {
			t.Errorf("request %s after etcd returned: %v", rid, err)
			continue
		}
		vms = append(vms, ad.GetVmId())
	}
	for _, vm := range vms {
		if _, err := c.DestroyVM(context.Background(), &shopv1.DestroyVMRequest{VmId: vm}); err != nil {
			t.Errorf("destroy %s: %v", vm, err)
		}
	}
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}
