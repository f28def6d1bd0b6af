package shop

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// Domains belong to their first owner; concurrent creates of one domain get
// distinct addresses and MACs (etcd transactions); destroy gives them back;
// a lease whose VM has no record is reclaimed.
func TestNetworkLeases(t *testing.T) {
	te := startTestEtcd(t)
	// A long deadline: eight auctions at once on a busy machine.
	ts := startTestShop(t, te, Config{AuctionDeadline: 10 * time.Second})
	p := &fakePlant{name: "p1", vms: map[string]bool{}}
	runPlant(t, te, p, "", 5)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	eventually(t, 10*time.Second, "the plant registered", func() bool { _, ok := ts.shop.market.Plant("p1"); return ok })
	n := ts.shop.vms.net

	if _, err := n.claimDomain(ctx, "bob", "bobs"); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.create(ctx, &shopv1.CreateVMRequest{RequestId: "steal", NetworkDomain: "bobs"}); codeOf(err) != codes.PermissionDenied {
		t.Fatalf("another owner's domain: %v, want PermissionDenied", err)
	}

	const vms = 8
	var wg sync.WaitGroup
	ids := make([]string, vms)
	errs := make([]error, vms)
	for i := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ad, err := ts.create(ctx, &shopv1.CreateVMRequest{RequestId: fmt.Sprint("c", i), NetworkDomain: "lab"})
			errs[i] = err
			if err == nil {
				ids[i] = ad.VmId
			}
		}()
	}
	wg.Wait()
	ips, macs := map[string]bool{}, map[string]bool{}
	for i, id := range ids {
		if errs[i] != nil {
			t.Fatalf("create %d: %v", i, errs[i])
		}
		l, ok, err := n.vmLease(ctx, id)
		if err != nil || !ok {
			t.Fatalf("lease of %s: %v %v", id, ok, err)
		}
		if ips[l.IP] || macs[l.MAC] {
			t.Fatalf("lease %+v given twice", l)
		}
		ips[l.IP], macs[l.MAC] = true, true
	}
	d, _, _ := n.domain(ctx, "lab")
	if got := p.last.Network; got == nil || got.Vni != d.Index || got.Domain != "lab" || got.HostAddress == "" || got.HostAddress == got.Address {
		t.Fatalf("the plant got network %+v (domain %+v)", got, d)
	}
	leased, _ := n.leased(ctx, "lab")
	if len(leased) != vms+1 { // and the plant's own address
		t.Fatalf("%d addresses leased, want %d: %v", len(leased), vms+1, leased)
	}
	if _, err := ts.client.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: ids[0]}); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := n.vmLease(ctx, ids[0]); ok {
		t.Fatal("destroy kept the lease")
	}
	if leased, _ := n.leased(ctx, "lab"); len(leased) != vms {
		t.Fatalf("after destroy %d addresses leased: %v", len(leased), leased)
	}
	// An orphan (its VM record gone without a destroy) is reclaimed.
	if _, err := n.leaseVM(ctx, "lab", d, "vm-orphan"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the orphan's lease reclaimed", func() bool { _, ok, _ := n.vmLease(ctx, "vm-orphan"); return !ok })
}
