package shop

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services"
)

// TestPlantReachedAtOnceWhenBack is issue 15 (fault suite): a destroy
// right after a plant restarted answered "connection refused", because the
// shop's connection to it still waited out gRPC's reconnect backoff. A
// plant that is back on its address is reached by the next call.
func TestPlantReachedAtOnceWhenBack(t *testing.T) {
	fp := &fakePlant{name: "plant0", vms: map[string]bool{"vm-a": true, "vm-b": true}}
	register := func(gs *grpc.Server) { computev1.RegisterPlantServiceServer(gs, fp) }
	addr, stop := serve(t, "", register)
	pool := newPlantPool(services.TLSFiles{}, "service-token")
	defer pool.Close()
	c, err := pool.get(addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.DestroyVM(ctx, &computev1.DestroyVMRequest{VmId: "vm-a"}); err != nil {
		t.Fatal(err)
	}
	// The plant is down for a while: calls fail, and the connection's
	// reconnect backoff grows.
	stop()
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if _, err := c.GetVM(ctx, &computev1.GetVMRequest{VmId: "vm-b"}); status.Code(err) != codes.Unavailable {
			t.Fatalf("GetVM of a plant that is down: %v, want Unavailable", err)
		}
	}
	serve(t, addr, register)
	start := time.Now()
	if _, err := c.DestroyVM(ctx, &computev1.DestroyVMRequest{VmId: "vm-b"}); err != nil {
		t.Fatalf("destroy right after the plant came back: %v", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("the destroy took %v", took)
	}
}
