package shop

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/encoding/protojson"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/market"
)

// Live migration (Goiri et al. §4): the shop chooses the destination (an
// auction without the VM's plant, or the plant the owner names), tells the
// source plant where it is (owners never choose where a plant sends a VM's
// memory), relays the progress and moves the classad: MIGRATING while the
// source drives the migration, RUNNING on the destination after it.

// migrateTimeout bounds a migration the shop drives: it goes on when the
// caller goes away.
const migrateTimeout = 15 * time.Minute

// migrateProgress reports a migration's progress to its caller.
type migrateProgress func(*shopv1.MigrateVMProgress)

// migrate moves a running VM of r to another plant.
func (v *vms) migrate(ctx context.Context, r *record, req *shopv1.MigrateVMRequest, send migrateProgress) (*computev1.ClassAd, error) {
	return v.migrateFrom(ctx, r, "", req, send)
}

// migrateFrom is migrate of a VM that must still be on plant from (empty:
// anywhere) once its claim is held: a drain moves a VM off its plant once,
// whichever shop gets to it first.
func (v *vms) migrateFrom(ctx context.Context, r *record, from string, req *shopv1.MigrateVMRequest, send migrateProgress) (*computev1.ClassAd, error) {
	// A VM recorded MIGRATING is looked at under the claim: its driver
	// holds it, or died (unstick).
	if err := migratable(r, v.lost(r)); err != nil && r.classad().State != computev1.VMState_VM_STATE_MIGRATING {
		return nil, err
	}
	// The VM's driving claim, as its creation and the other verbs hold it
	// (verbs.go): one of them at a time; it goes with the shop's lease.
	ok, _, err := v.store.claim(ctx, drivingPrefix+r.VMID)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("vm %q is busy: it is migrating, or being created, suspended, resumed or published; retry when that is done: %w",
			r.VMID, errBusy)
	}
	defer v.store.release(drivingPrefix + r.VMID)
	if r, _, err = v.store.vm(ctx, r.VMID); err != nil { // as it is now the claim is held
		return nil, err
	}
	if from != "" && r.Plant != from {
		return nil, fmt.Errorf("vm %q is on plant %s now, not %s: %w", r.VMID, r.Plant, from, errMoved)
	}
	v.unstick(ctx, r)
	if err := migratable(r, v.lost(r)); err != nil {
		return nil, err
	}
	ad := r.classad()
	dest, err := v.destination(ctx, r, ad, req.To)
	if err != nil {
		return nil, err
	}
	send(&shopv1.MigrateVMProgress{Phase: "placing", Message: "destination plant " + dest.Plant})
	nw, err := v.attachment(ctx, r, ad.GetNetwork().GetDomain(), dest.Plant)
	if err != nil {
		return nil, err
	}
	if err := v.setState(ctx, r, computev1.VMState_VM_STATE_MIGRATING); err != nil {
		return nil, err
	}
	moved, err := v.migrateOn(ctx, r, dest, nw, req, send)
	if err != nil {
		// The VM runs on where it was (the plant's contract).
		if serr := v.setState(context.WithoutCancel(ctx), r, computev1.VMState_VM_STATE_RUNNING); serr != nil {
			v.log.Warn("record the VM running after a failed migration", zap.String("vm", r.VMID), zap.Error(serr))
		}
		return nil, err
	}
	moved.Labels = mergeLabels(moved.Labels, ad.Labels)
	r.Plant, r.PlantAddr, r.ClassAd = dest.Plant, dest.Addr, fit(moved)
	if err := v.store.putVM(context.WithoutCancel(ctx), r); err != nil {
		return nil, fmt.Errorf("vm %s runs on plant %s now, but recording it failed: %w", r.VMID, dest.Plant, err)
	}
	v.log.Info("VM migrated", zap.String("vm", r.VMID), zap.String("from", moved.MigratedFrom), zap.String("to", dest.Plant))
	return moved, nil
}

// errMoved is a VM that left the plant it was to be moved off; errBusy one
// whose claim another verb (or another shop's drain) holds. Both read as
// the sentinel they wrap, so callers see FailedPrecondition and the
// message before it.
var (
	errMoved = fmt.Errorf("%w", errdefs.ErrFailedPrecondition)
	errBusy  = fmt.Errorf("%w", errdefs.ErrFailedPrecondition)
)

// unstick repairs the record of a VM left MIGRATING by a shop that died
// while it drove the migration (the claim is held now, so nobody drives
// it): a source plant that lost its caller aborts, and the VM runs on there
// (the plant's contract), which is what its record then says again.
func (v *vms) unstick(ctx context.Context, r *record) {
	if r.classad().State != computev1.VMState_VM_STATE_MIGRATING || r.PlantAddr == "" {
		return
	}
	c, err := v.plants.get(r.PlantAddr)
	if err != nil {
		return
	}
	gctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	got, err := c.GetVM(gctx, &computev1.GetVMRequest{VmId: r.VMID})
	if err != nil || got.State != computev1.VMState_VM_STATE_RUNNING {
		return
	}
	if err := v.setState(ctx, r, computev1.VMState_VM_STATE_RUNNING); err == nil {
		v.log.Info("VM left migrating by a shop that went away runs on its plant; recorded running again", zap.String("vm", r.VMID), zap.String("plant", r.Plant))
	}
}

// migratable refuses a VM that is not running on a plant that is there.
func migratable(r *record, lost bool) error {
	ad := r.classad()
	switch {
	case r.State != stateReady || r.PlantAddr == "":
		return fmt.Errorf("vm %q is %s, not running: %w", r.VMID, ad.State, errdefs.ErrFailedPrecondition)
	case lost:
		return fmt.Errorf("vm %q is lost with its plant %s: %w", r.VMID, r.Plant, errdefs.ErrFailedPrecondition)
	case ad.State == computev1.VMState_VM_STATE_MIGRATING:
		return fmt.Errorf("vm %q is migrating already: %w", r.VMID, errdefs.ErrFailedPrecondition)
	case ad.State != stateReady:
		return fmt.Errorf("vm %q is %s, not running: %w", r.VMID, ad.State, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// destination is the plant named to, or the auction's winner among the
// other plants.
func (v *vms) destination(ctx context.Context, r *record, ad *computev1.ClassAd, to string) (market.Bid, error) {
	if to != "" {
		p, ok := v.registry.Plant(to)
		switch {
		case !ok:
			return market.Bid{}, fmt.Errorf("no plant %q is registered: %w", to, errdefs.ErrNotFound)
		case to == r.Plant:
			return market.Bid{}, fmt.Errorf("vm %q is on plant %s already: %w", r.VMID, to, errdefs.ErrFailedPrecondition)
		case p.Draining:
			return market.Bid{}, fmt.Errorf("plant %s is draining (leaving the grid) and takes no VMs; name another or leave --to out: %w", to, errdefs.ErrFailedPrecondition)
		}
		return market.Bid{Plant: p.Name, Addr: p.Addr}, nil
	}
	hw, w := ad.GetHardware(), v.cfg.Weights
	a := market.Auction{ID: r.VMID + "-migrate-" + fmt.Sprint(time.Now().UnixNano()), Image: r.Image,
		Arch: hw.GetArch(), VCPUs: hw.GetVcpus(), MemoryMiB: hw.GetMemoryMib(), Domain: ad.GetNetwork().GetDomain(), Weights: &w}
	bids, err := v.auction(ctx, a)
	if err != nil {
		return market.Bid{}, fmt.Errorf("auction: %w: %w", err, errdefs.ErrUnavailable)
	}
	var others []market.Bid
	for _, b := range bids {
		if b.Plant != r.Plant {
			others = append(others, b)
			if b.Refusal == "" {
				return b, nil // bids come cheapest first
			}
		}
	}
	if len(others) == 0 {
		return market.Bid{}, fmt.Errorf("no other plant bid to host vm %s: %w", r.VMID, errdefs.ErrResourceExhausted)
	}
	return market.Bid{}, fmt.Errorf("no other plant can host vm %s: %s: %w", r.VMID, market.Refusals(others), errdefs.ErrResourceExhausted)
}

// setState records the VM's classad state.
func (v *vms) setState(ctx context.Context, r *record, s computev1.VMState) error {
	ad := r.classad()
	ad.State = s
	b, err := protojson.Marshal(ad)
	if err != nil {
		return err
	}
	r.ClassAd = b
	return v.store.putVM(ctx, r)
}

// migrateOn asks the source plant to migrate the VM to dest, relaying its
// progress.
func (v *vms) migrateOn(ctx context.Context, r *record, dest market.Bid, nw *computev1.NetworkAttachment, req *shopv1.MigrateVMRequest, send migrateProgress) (*computev1.ClassAd, error) {
	c, err := v.plants.get(r.PlantAddr)
	if err != nil {
		return nil, err
	}
	stream, err := c.MigrateVM(ctx, &computev1.MigrateVMRequest{VmId: r.VMID, Destination: &computev1.MigrationPeer{Plant: dest.Plant, Addr: dest.Addr},
		PostCopy: req.PostCopy, Network: nw})
	if err != nil {
		return nil, err
	}
	for {
		p, err := stream.Recv()
		if err != nil {
			return nil, fmt.Errorf("plant %s: %w", r.Plant, err)
		}
		if p.Classad != nil {
			send(&shopv1.MigrateVMProgress{Phase: p.Phase, Message: p.Message, Stats: p.Stats})
			return p.Classad, nil
		}
		send(&shopv1.MigrateVMProgress{Phase: p.Phase, Message: r.Plant + ": " + p.Message, Stats: p.Stats})
	}
}

// MigrateVM implements ShopService.MigrateVM.
func (s *Shop) MigrateVM(req *shopv1.MigrateVMRequest, stream shopv1.ShopService_MigrateVMServer) error {
	ctx := stream.Context()
	start := time.Now()
	r, _, err := s.owned(ctx, req.VmId)
	if err != nil {
		return err
	}
	send := func(p *shopv1.MigrateVMProgress) {
		p.ElapsedNanos = int64(time.Since(start))
		_ = stream.Send(p)
	}
	// The migration goes on if the caller goes away: it ends with the VM
	// running on one plant or the other, never half moved.
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), migrateTimeout)
	defer cancel()
	ad, err := s.vms.migrate(dctx, r, req, send)
	if err != nil {
		return err
	}
	send(&shopv1.MigrateVMProgress{Phase: "running", Message: "running on " + ad.Plant, Stats: ad.LastMigration, Classad: ad})
	return nil
}
