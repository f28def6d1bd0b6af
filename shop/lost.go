package shop

import (
	"context"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Lost VMs. A plant's registration lives under its session lease, so a
// plant that died (or lost etcd) leaves the registry within its TTL; its
// VMs are then LOST, whatever their records last said. Destroying a lost VM
// removes its record at once and leaves a destroy order, which a shop
// carries out when the plant registers again (a plant that restarted has
// stopped its VMs; one that was only cut off still runs them).

// orderTTL bounds how long a destroy order waits for its plant.
const orderTTL = 7 * 24 * time.Hour

// view is a VM's classad as a reader should see it: LOST when its plant is
// gone, FAILED when the plant no longer has it or nobody drives its
// creation any more.
func (v *vms) view(ctx context.Context, r *record, driven map[string]bool) *computev1.ClassAd {
	ad := r.classad()
	switch {
	case r.State == statePlacing && !driven[drivingPrefix+r.VMID]:
		ad.State = stateFailed
		ad.Error = "the shop creating this VM went away (an etcd outage, or it died); retry the request with the same request id"
	case r.State != stateReady || r.PlantAddr == "":
	case v.lost(r):
		ad.State = computev1.VMState_VM_STATE_LOST
		ad.Error = "plant " + r.Plant + " is gone (its registration lapsed); destroy the VM and create another"
	default:
		v.check(ctx, r, ad)
	}
	return ad
}

// lost reports whether the plant of a VM is gone from the registry.
func (v *vms) lost(r *record) bool {
	p, ok := v.registry.Plant(r.Plant)
	return r.Plant != "" && (!ok || p.Addr != r.PlantAddr)
}

// check asks the plant of a ready VM whether it still has it: a plant that
// restarted stopped its VMs, and the classad in etcd would otherwise claim
// a VM that no longer runs.
func (v *vms) check(ctx context.Context, r *record, ad *computev1.ClassAd) {
	c, err := v.plants.get(r.PlantAddr)
	if err != nil {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	got, err := c.GetVM(cctx, &computev1.GetVMRequest{VmId: r.VMID})
	switch {
	case errdefs.IsNotFound(err):
		ad.State = stateFailed
		ad.Error = "plant " + r.Plant + " no longer runs this VM (it restarted or lost it); destroy it and create another"
	case err == nil && got.State == computev1.VMState_VM_STATE_SUSPENDED:
		// A suspend saved the machine but has not finished (verbs.go).
		ad.State, ad.Error = got.State, got.Error
	}
}

// orderDestroy leaves the destroy of a lost VM to its plant's return.
func (s *etcdStore) orderDestroy(ctx context.Context, plant, vmID string) error {
	gctx, cancel := op(ctx)
	lease, err := s.cli.Grant(gctx, int64(orderTTL/time.Second))
	cancel()
	if err != nil {
		return etcdErr(err)
	}
	_, err = s.txn(ctx, nil, []clientv3.Op{clientv3.OpPut(ordersPrefix+plant+"/"+vmID, "", clientv3.WithLease(lease.ID))}, nil)
	return err
}

// orderDone removes a destroy order carried out.
func (s *etcdStore) orderDone(ctx context.Context, key string) error {
	_, err := s.txn(ctx, nil, []clientv3.Op{clientv3.OpDelete(key)}, nil)
	return err
}

// reap carries out the destroy orders of the plants that are back, every
// interval until ctx ends. Every shop does; a destroy is idempotent.
func (v *vms) reap(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		orders, err := v.store.claimed(ctx, ordersPrefix)
		if err != nil {
			continue
		}
		for key := range orders {
			v.carryOut(ctx, key)
		}
		v.net.reclaim(ctx, v.registry)
	}
}

// carryOut destroys an ordered VM if its plant is registered.
func (v *vms) carryOut(ctx context.Context, key string) {
	plant, vmID, _ := strings.Cut(strings.TrimPrefix(key, ordersPrefix), "/")
	p, ok := v.registry.Plant(plant)
	if !ok {
		return
	}
	c, err := v.plants.get(p.Addr)
	if err != nil {
		return
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := c.DestroyVM(dctx, &computev1.DestroyVMRequest{VmId: vmID}); err != nil && !errdefs.IsNotFound(err) {
		v.log.Debug("destroy order not carried out yet", zap.String("plant", plant), zap.String("vm", vmID), zap.Error(err))
		return
	}
	v.log.Info("destroyed a VM destroyed while its plant was gone", zap.String("plant", plant), zap.String("vm", vmID))
	_ = v.store.orderDone(ctx, key)
}
