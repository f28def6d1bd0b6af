//go:build faults

package faults

import (
	"context"
	"testing"
	"time"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// VMs through the shop.

func (g *grid) shopClient(token string) shopv1.ShopServiceClient {
	return shopv1.NewShopServiceClient(g.dial(g.shop.addr, token))
}

// createVM runs a CreateVM to its last message.
func createVM(ctx context.Context, c shopv1.ShopServiceClient, req *shopv1.CreateVMRequest) (*computev1.ClassAd, error) {
	st, err := c.CreateVM(ctx, req)
	if err != nil {
		return nil, err
	}
	for {
		p, err := st.Recv()
		if err != nil {
			return nil, err
		}
		if p.GetClassad() != nil {
			return p.GetClassad(), nil
		}
	}
}

func tinyVM(id string) *shopv1.CreateVMRequest {
	return &shopv1.CreateVMRequest{RequestId: id, Image: "tiny"}
}

// smoke: a VM is created, read back and destroyed through the shop.
func (g *grid) smoke(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := g.shopClient(ownerToken)
	start := time.Now()
	ad, err := createVM(ctx, c, tinyVM("smoke-1"))
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Logf("VM %s on %s (%v) in %v", ad.GetVmId(), ad.GetPlant(), ad.GetState(), time.Since(start))
	if _, err := c.GetVM(ctx, &shopv1.GetVMRequest{VmId: ad.GetVmId()}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: ad.GetVmId()}); err != nil {
		t.Fatal(err)
	}
}
