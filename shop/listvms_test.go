package shop

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/auth"
)

// ListVMs with all: every owner's VMs for an operator, PermissionDenied for
// anyone else (vmgrid vm ls --all).
func TestListVMsAll(t *testing.T) {
	te := startTestEtcd(t)
	ts := startTestShop(t, te, Config{})
	runPlant(t, te, &fakePlant{name: "p1", vms: map[string]bool{}}, "", 5)
	ctx := context.Background()
	eventually(t, 10*time.Second, "the plant registered", func() bool { _, ok := ts.shop.market.Plant("p1"); return ok })
	ad, err := ts.create(ctx, &shopv1.CreateVMRequest{RequestId: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	as := func(name string, role auth.Role) context.Context {
		return auth.WithCaller(ctx, auth.Caller{Name: name, Role: role})
	}
	for _, tc := range []struct {
		who  context.Context
		all  bool
		want int
		code codes.Code
	}{
		{as("demo", auth.RoleOwner), false, 1, codes.OK},
		{as("demo", auth.RoleOwner), true, 0, codes.PermissionDenied},
		{as("bob", auth.RoleOwner), false, 0, codes.OK},
		{as("ops", auth.RoleOperator), false, 0, codes.OK},
		{as("ops", auth.RoleOperator), true, 1, codes.OK},
		{as("shop", auth.RoleService), true, 0, codes.PermissionDenied},
	} {
		c, _ := auth.CallerOf(tc.who)
		list, err := ts.shop.ListVMs(tc.who, &shopv1.ListVMsRequest{All: tc.all})
		if codeOf(err) != tc.code || err == nil && (len(list.Vms) != tc.want || tc.want == 1 && list.Vms[0].VmId != ad.VmId) {
			t.Errorf("%s (%s) all=%v: %v, %v; want %d VMs, code %s", c.Name, c.Role, tc.all, list, err, tc.want, tc.code)
		}
	}
}
