package testutil

import (
	"context"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// CreateVM calls the shop's CreateVM and returns the classad its last
// progress message carries.
func CreateVM(ctx context.Context, c shopv1.ShopServiceClient, req *shopv1.CreateVMRequest) (*computev1.ClassAd, error) {
	stream, err := c.CreateVM(ctx, req)
	if err != nil {
		return nil, err
	}
	for {
		p, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		if p.Classad != nil {
			return p.Classad, nil
		}
	}
}
