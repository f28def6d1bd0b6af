package shop

import (
	"context"
	"fmt"
	"time"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// The gRPC adapter: each method authenticates the owner and hands over to
// the logic (vms, taskRunner).

var _ shopv1.ShopServiceServer = (*Shop)(nil)

// CreateVM implements ShopService.CreateVM.
func (s *Shop) CreateVM(req *shopv1.CreateVMRequest, stream shopv1.ShopService_CreateVMServer) error {
	ctx := stream.Context()
	start := time.Now()
	owner, err := auth.Owner(ctx)
	if err != nil {
		return err
	}
	send := func(p *shopv1.CreateVMProgress) {
		p.ElapsedNanos = int64(time.Since(start))
		_ = stream.Send(p)
	}
	// The creation goes on if the client goes away: a retry of the request
	// then finds the VM ready instead of half made.
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Minute)
	defer cancel()
	ad, err := s.vms.create(dctx, owner, req, send)
	if err != nil {
		return err
	}
	send(&shopv1.CreateVMProgress{Stage: "ready", Message: "ready on " + ad.Plant, State: ad.State, Image: ad.Image, Classad: ad})
	return nil
}

// owned returns the record of a VM of the caller's.
func (s *Shop) owned(ctx context.Context, vmID string) (*record, int64, error) {
	return ownedBy(ctx, "vm", vmID, s.store.vm, func(r *record) string { return r.Owner })
}

// ownedBy reads what id names with get and checks it is the caller's.
func ownedBy[T any](ctx context.Context, what, id string, get func(context.Context, string) (T, int64, error), owner func(T) string) (T, int64, error) {
	var zero T
	caller, err := auth.Owner(ctx)
	if err != nil {
		return zero, 0, err
	}
	v, rev, err := get(ctx, id)
	if err != nil {
		return zero, 0, err
	}
	if owner(v) != caller {
		return zero, 0, fmt.Errorf("%s %q belongs to another owner: %w", what, id, errdefs.ErrPermissionDenied)
	}
	return v, rev, nil
}

// GetVM implements ShopService.GetVM.
func (s *Shop) GetVM(ctx context.Context, req *shopv1.GetVMRequest) (*computev1.ClassAd, error) {
	r, _, err := s.owned(ctx, req.VmId)
	if err != nil {
		return nil, err
	}
	return s.vms.get(ctx, r)
}

// ListVMs implements ShopService.ListVMs.
// Everyone lists their own VMs; operators may ask for all owners'.
func (s *Shop) ListVMs(ctx context.Context, req *shopv1.ListVMsRequest) (*shopv1.ListVMsResponse, error) {
	c, err := auth.CallerOf(ctx)
	if err != nil {
		return nil, err
	}
	sees := func(o string) bool { return o == c.Name }
	if req.All {
		if c.Role != auth.RoleOperator {
			return nil, fmt.Errorf("listing every owner's VMs takes an operator token: %w", errdefs.ErrPermissionDenied)
		}
		sees = c.Sees
	}
	ads, err := s.vms.list(ctx, sees)
	if err != nil {
		return nil, err
	}
	return &shopv1.ListVMsResponse{Vms: ads}, nil
}

// DestroyVM implements ShopService.DestroyVM.
func (s *Shop) DestroyVM(ctx context.Context, req *shopv1.DestroyVMRequest) (*shopv1.DestroyVMResponse, error) {
	r, _, err := s.owned(ctx, req.VmId)
	if err != nil {
		return nil, err
	}
	return &shopv1.DestroyVMResponse{}, s.vms.destroy(ctx, r)
}

// WatchVM implements ShopService.WatchVM.
func (s *Shop) WatchVM(req *shopv1.WatchVMRequest, stream shopv1.ShopService_WatchVMServer) error {
	ctx := stream.Context()
	r, rev, err := s.owned(ctx, req.VmId)
	if err != nil {
		return err
	}
	if err := stream.Send(r.classad()); err != nil {
		return err
	}
	return s.store.watchVM(ctx, req.VmId, rev, func(nr *record) (bool, error) {
		if nr == nil {
			ad := r.classad()
			ad.State = computev1.VMState_VM_STATE_DESTROYED
			return true, stream.Send(ad)
		}
		r = nr
		return false, stream.Send(nr.classad())
	})
}

// SubmitTask implements ShopService.SubmitTask.
func (s *Shop) SubmitTask(ctx context.Context, req *shopv1.SubmitTaskRequest) (*shopv1.Task, error) {
	owner, err := auth.Owner(ctx)
	if err != nil {
		return nil, err
	}
	if s.cfg.DataServer == "" {
		return nil, fmt.Errorf("this shop has no data server (--dataserver), so it runs no tasks: %w", errdefs.ErrFailedPrecondition)
	}
	return submitTask(ctx, s.store, s.tasks, owner, req)
}

// ownedTask returns a task of the caller's and the revision it was read at.
func (s *Shop) ownedTask(ctx context.Context, id string) (*shopv1.Task, int64, error) {
	return ownedBy(ctx, "task", id, s.store.task, (*shopv1.Task).GetOwner)
}

// GetTask implements ShopService.GetTask.
func (s *Shop) GetTask(ctx context.Context, req *shopv1.GetTaskRequest) (*shopv1.Task, error) {
	t, _, err := s.ownedTask(ctx, req.TaskId)
	return t, err
}

// CancelTask implements ShopService.CancelTask.
func (s *Shop) CancelTask(ctx context.Context, req *shopv1.GetTaskRequest) (*shopv1.Task, error) {
	if _, _, err := s.ownedTask(ctx, req.TaskId); err != nil {
		return nil, err
	}
	return cancelTask(ctx, s.store, req.TaskId)
}

// WatchTask implements ShopService.WatchTask.
func (s *Shop) WatchTask(req *shopv1.GetTaskRequest, stream shopv1.ShopService_WatchTaskServer) error {
	ctx := stream.Context()
	t, rev, err := s.ownedTask(ctx, req.TaskId)
	if err != nil {
		return err
	}
	if err := stream.Send(t); err != nil || terminal(t.State) {
		return err
	}
	return watchTask(ctx, s.store, t, rev, stream.Send)
}
