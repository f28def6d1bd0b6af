package shop

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Draining plants (issue 16: "a plant that leaves drains"). A plant asked
// to stop posts that it is draining (market.PlantInfo.Draining) and waits,
// for its drain timeout, while the shops move its running VMs away; it
// refuses every auction meanwhile. Every shop watches the registry and
// migrates the VMs of draining plants as MigrateVM without a destination
// does (an auction that excludes the source). Each migration holds the
// VM's driving claim, so one shop moves a VM and the others pass it by;
// a shop that dies mid-drain lets its claims go with its lease and the
// others take its VMs over (the claim's holder re-reads the record, so a
// VM moved already is not moved again). A VM that cannot move live
// (migratable on the plant refuses it), or that no other plant has room
// for, stays: the plant stops it when its timeout ends, and it is listed
// lost, as without draining.

const (
	// drainInterval is how often a shop looks for VMs on draining plants.
	drainInterval = time.Second
	// drainRetry is how long a VM whose move failed waits for the next
	// attempt (another plant may have room by then); one that cannot move
	// live waits drainRetryStuck (it may only if it changes: a hot-plugged
	// disk detached).
	drainRetry      = 5 * time.Second
	drainRetryStuck = time.Minute
	// drainParallel bounds the migrations one shop drives at once.
	drainParallel = 2
)

// Results of a drain migration (vmgrid_shop_drain_migrations_total).
const (
	drainMigrated   = "migrated"
	drainCannotMove = "cannot_move"
	drainNoRoom     = "no_room"
	drainFailed     = "failed"
)

// drainer moves the VMs of draining plants.
type drainer struct {
	v *vms

	mu    sync.Mutex
	busy  map[string]bool      // VMs this shop is moving now
	retry map[string]time.Time // when a VM whose move failed is tried again
	wg    sync.WaitGroup
}

func newDrainer(v *vms) *drainer {
	return &drainer{v: v, busy: map[string]bool{}, retry: map[string]time.Time{}}
}

// run looks for VMs to move every interval until ctx ends, then waits for
// the migrations it started (they end with the VM on one plant or the
// other: the plant's contract).
func (d *drainer) run(ctx context.Context, interval time.Duration) {
	defer d.wg.Wait()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d.pass(ctx)
	}
}

// pass starts moving the running VMs of the draining plants, as many as
// drainParallel allows.
func (d *drainer) pass(ctx context.Context) {
	draining := map[string]string{} // plant → its address
	for _, p := range d.v.registry.Plants() {
		if p.Draining {
			draining[p.Name] = p.Addr
		}
	}
	var recs []*record
	if len(draining) > 0 {
		var err error
		if recs, err = d.v.store.vms(ctx); err != nil {
			d.v.log.Debug("drain: list VMs", zap.Error(err))
			return
		}
	}
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	for id, at := range d.retry {
		if now.After(at) {
			delete(d.retry, id) // its plant left, or it is looked at again below
		}
	}
	for _, r := range recs {
		if addr, ok := draining[r.Plant]; !ok || addr != r.PlantAddr || r.State != stateReady {
			continue
		}
		if d.busy[r.VMID] || now.Before(d.retry[r.VMID]) {
			continue
		}
		if len(d.busy) >= drainParallel {
			return
		}
		d.busy[r.VMID] = true
		d.wg.Add(1)
		go d.move(ctx, r)
	}
}

// move migrates one VM off its draining plant.
func (d *drainer) move(ctx context.Context, r *record) {
	defer d.wg.Done()
	mctx, cancel := context.WithTimeout(ctx, migrateTimeout)
	defer cancel()
	ad, err := d.v.migrateFrom(mctx, r, r.Plant, &shopv1.MigrateVMRequest{VmId: r.VMID}, func(*shopv1.MigrateVMProgress) {})
	result := drainResult(err)
	d.mu.Lock()
	delete(d.busy, r.VMID)
	if result == drainMigrated || result == "" {
		delete(d.retry, r.VMID) // a busy VM is looked at again on the next pass
	} else if result == drainCannotMove {
		d.retry[r.VMID] = time.Now().Add(drainRetryStuck)
	} else {
		d.retry[r.VMID] = time.Now().Add(drainRetry)
	}
	d.mu.Unlock()
	log := d.v.log.With(zap.String("vm", r.VMID), zap.String("plant", r.Plant))
	switch {
	case result == "":
		log.Debug("drain: the VM is moved or busy elsewhere", zap.Error(err))
		return
	case err == nil:
		log.Info("drain: VM migrated off its draining plant", zap.String("to", ad.Plant))
	default:
		log.Warn("drain: VM not migrated off its draining plant; it stays there (lost if the plant leaves first), retried shortly",
			zap.String("result", result), zap.Error(err))
	}
	d.v.metrics.drains.WithLabelValues(result).Inc()
}

// drainResult names the outcome of a drain migration; "" is one that was
// not this shop's to make (another holds the VM's claim, or moved it).
func drainResult(err error) string {
	switch {
	case err == nil:
		return drainMigrated
	case errors.Is(err, errMoved), errors.Is(err, errBusy):
		return ""
	case errors.Is(err, errdefs.ErrResourceExhausted):
		return drainNoRoom
	case errdefs.IsFailedPrecondition(err):
		return drainCannotMove
	}
	return drainFailed
}

// DrainPlant implements ShopService.DrainPlant (operators only,
// auth.ShopPolicy): the plant marks itself draining and posts it, and the
// shops' drainers move its VMs.
func (s *Shop) DrainPlant(ctx context.Context, req *shopv1.DrainPlantRequest) (*shopv1.DrainPlantResponse, error) {
	p, ok := s.market.Plant(req.Plant)
	if !ok {
		return nil, fmt.Errorf("no plant %q is registered: %w", req.Plant, errdefs.ErrNotFound)
	}
	c, err := s.plants.get(p.Addr)
	if err != nil {
		return nil, err
	}
	resp, err := c.DrainPlant(ctx, &computev1.DrainPlantRequest{})
	if err != nil {
		return nil, fmt.Errorf("plant %s: %w", req.Plant, err)
	}
	s.log.Info("plant draining at an operator's request", zap.String("plant", req.Plant), zap.Uint32("vms", resp.Vms))
	return &shopv1.DrainPlantResponse{Vms: resp.Vms}, nil
}
