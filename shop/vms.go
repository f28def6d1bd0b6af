package shop

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/dag"
	"github.com/vmgrid/vmgrid/shop/market"
)

// vms is the logic of the shop's VMs: create (match, auction, create on
// the winner, record), look up, destroy.
type vms struct {
	cfg      Config
	log      *zap.Logger
	store    vmStore
	plants   *plantPool
	registry *market.Registry
	metrics  *metrics
	net      *networks // domains and leases (networks.go)
}

// progress reports a creation's progress to its caller.
type progress func(*shopv1.CreateVMProgress)

// create makes (or, for a known request, finds) an owner's VM.
func (v *vms) create(ctx context.Context, owner string, req *shopv1.CreateVMRequest, send progress) (*computev1.ClassAd, error) {
	// The DAG is validated, ordered and digested once; the match and the
	// plant work from this plan.
	plan, err := dag.New(req.Config)
	if err != nil {
		return nil, fmt.Errorf("config: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	if err := v.claimDomain(ctx, owner, req.NetworkDomain); err != nil {
		return nil, err
	}
	fresh := &record{VMID: VMID(owner, req.RequestId), Owner: owner, RequestID: req.RequestId, State: statePlacing, RequestHash: requestHash(req)}
	known, err := v.store.createRequest(ctx, fresh)
	if err != nil {
		return nil, err
	}
	if known != nil {
		if ad, done, err := v.retried(ctx, fresh, known); done {
			return ad, err
		}
	}
	// One driver per VM at a time: concurrent retries wait for it, and take
	// over when its shop dies (the claim goes with the shop's lease).
	claimed, ad, err := v.claimOrWait(ctx, fresh.VMID)
	if err != nil || !claimed {
		return ad, err
	}
	defer v.store.release(drivingPrefix + fresh.VMID)
	rec, _, err := v.store.vm(ctx, fresh.VMID)
	if err != nil {
		return nil, err
	}
	switch {
	case rec.State == stateReady:
		return rec.classad(), nil
	case rec.State == stateFailed && !rec.Retry:
		return nil, failedBefore(rec)
	case rec.State == stateFailed:
		// Retried after a passing failure: the records no longer expire.
		rec.State, rec.Error, rec.Retry = statePlacing, "", false
		if err := v.store.putRequest(ctx, rec, 0); err != nil {
			return nil, err
		}
	}
	return v.finish(ctx, rec, req, plan, send)
}

// retried answers a request id that is known: done with the VM or the
// failure, or not done (the creation goes on, see claimOrWait).
func (v *vms) retried(ctx context.Context, fresh *record, known *requestRecord) (*computev1.ClassAd, bool, error) {
	if known.Hash != "" && known.Hash != fresh.RequestHash {
		return nil, true, fmt.Errorf("request id %q was used for another request (vm %s); a retry must repeat the request exactly, or use a new request id: %w",
			fresh.RequestID, known.VMID, errdefs.ErrAlreadyExists)
	}
	rec, _, err := v.store.vm(ctx, fresh.VMID)
	if errdefs.IsNotFound(err) {
		return nil, true, fmt.Errorf("request %q created vm %s, which was destroyed since; use a new request id: %w", fresh.RequestID, fresh.VMID, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		return nil, true, err
	}
	switch {
	case rec.State == stateReady:
		return rec.classad(), true, nil
	case rec.State == stateFailed && !rec.Retry:
		return nil, true, failedBefore(rec)
	}
	return nil, false, nil
}

// failedBefore is the answer to a retry of a request that failed for good.
func failedBefore(rec *record) error {
	return fmt.Errorf("request %q failed before: %s; use a new request id: %w", rec.RequestID, rec.Error, errdefs.ErrFailedPrecondition)
}

// finish drives the creation and records its outcome.
func (v *vms) finish(ctx context.Context, rec *record, req *shopv1.CreateVMRequest, plan *dag.Plan, send progress) (*computev1.ClassAd, error) {
	ad, err := v.drive(ctx, req, plan, rec, send)
	if err == nil {
		v.metrics.creates.WithLabelValues("created").Inc()
		return ad, nil
	}
	v.metrics.creates.WithLabelValues("failed").Inc()
	if ctx.Err() != nil {
		return nil, err // the record shows a creation nobody drives
	}
	// A failure is remembered, for a while; a passing one (an outage, no
	// plant free) lets a retry with the same request id try again.
	rec.State, rec.Error, rec.Retry = stateFailed, err.Error(), passing(err)
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), market.OpTimeout)
	defer cancel()
	if perr := v.store.putRequest(rctx, rec, v.cfg.FailedTTL); perr != nil {
		v.log.Warn("record a failed request", zap.String("vm", rec.VMID), zap.Error(perr))
	}
	return nil, err
}

// passing reports a failure that a retry may not meet.
func passing(err error) bool {
	return errdefs.IsUnavailable(err) || errors.Is(err, errdefs.ErrResourceExhausted) || errors.Is(err, context.DeadlineExceeded)
}

// claimOrWait makes this shop the driver of a VM's creation, or waits for
// the driver to finish: it returns claimed, or the VM's classad (or its
// failure) as the driver left it.
func (v *vms) claimOrWait(ctx context.Context, vmID string) (bool, *computev1.ClassAd, error) {
	key := drivingPrefix + vmID
	for {
		ok, rev, err := v.store.claim(ctx, key)
		if err != nil || ok {
			return ok, nil, err
		}
		v.store.waitReleased(ctx, key, rev)
		if ctx.Err() != nil {
			return false, nil, ctx.Err()
		}
		r, _, err := v.store.vm(ctx, vmID)
		if err != nil {
			return false, nil, err
		}
		switch r.State {
		case stateReady:
			return false, r.classad(), nil
		case stateFailed:
			return false, nil, fmt.Errorf("vm %s failed: %s: %w", vmID, r.Error, errdefs.ErrFailedPrecondition)
		}
	}
}

// drive matches, auctions and creates.
func (v *vms) drive(ctx context.Context, req *shopv1.CreateVMRequest, plan *dag.Plan, rec *record, send progress) (*computev1.ClassAd, error) {
	start := time.Now()
	image, size, hw, err := v.match(ctx, rec.Owner, req, plan)
	if err != nil {
		return nil, err
	}
	send(&shopv1.CreateVMProgress{Stage: "matching", Message: "golden image " + image, Image: image})
	rec.Image = image
	var bids []market.Bid
	if rec.PlantAddr != "" {
		// A previous attempt chose a plant: ask it first.
		bids = append(bids, market.Bid{Plant: rec.Plant, Addr: rec.PlantAddr})
	}
	w := v.cfg.Weights
	a := market.Auction{ID: rec.VMID + "-" + fmt.Sprint(time.Now().UnixNano()), Image: image, ImageSize: size,
		Arch: hw.Arch, VCPUs: hw.Vcpus, MemoryMiB: hw.MemoryMib, Domain: req.NetworkDomain, Weights: &w}
	got, err := v.auction(ctx, a)
	if err != nil {
		return nil, fmt.Errorf("auction: %w: %w", err, errdefs.ErrUnavailable)
	}
	v.metrics.placement.Observe(time.Since(start).Seconds())
	bids = append(bids, got...)
	send(&shopv1.CreateVMProgress{Stage: "bidding", Message: fmt.Sprintf("%d bids", len(got)), Bids: protoBids(got)})
	if len(bids) == 0 {
		return nil, fmt.Errorf("no plant is registered: %w", errdefs.ErrResourceExhausted)
	}
	return v.createOnWinner(ctx, req, rec, bids, got, send)
}

func protoBids(bids []market.Bid) []*shopv1.Bid {
	pb := make([]*shopv1.Bid, 0, len(bids))
	for _, b := range bids {
		pb = append(pb, &shopv1.Bid{Plant: b.Plant, Cost: b.Cost, Refusal: b.Refusal})
	}
	return pb
}

// createOnWinner asks the bidders in order until one creates the VM.
func (v *vms) createOnWinner(ctx context.Context, req *shopv1.CreateVMRequest, rec *record, bids, got []market.Bid, send progress) (*computev1.ClassAd, error) {
	var tried []string
	for _, b := range bids {
		if b.Refusal != "" {
			continue
		}
		rec.Plant, rec.PlantAddr = b.Plant, b.Addr
		if err := v.store.putVM(ctx, rec); err != nil {
			return nil, err
		}
		send(&shopv1.CreateVMProgress{Stage: "creating", Message: "plant " + b.Plant + " won"})
		ad, err := v.createOn(ctx, b, req, rec, send)
		if err == nil {
			ad.Labels = mergeLabels(ad.Labels, req.Labels)
			rec.State, rec.ClassAd, rec.Error = stateReady, fit(ad), ""
			if err := v.store.putVM(ctx, rec); err != nil {
				return nil, err
			}
			return ad, nil
		}
		if !errdefs.IsUnavailable(err) && !errors.Is(err, context.DeadlineExceeded) && !errdefs.IsNotFound(err) {
			return nil, err // the request itself failed (an action, the image)
		}
		v.log.Warn("winner failed; trying the next bid", zap.String("plant", b.Plant), zap.Error(err))
		tried = append(tried, fmt.Sprintf("%s: %v", b.Plant, err))
	}
	reason := market.Refusals(got)
	if len(tried) > 0 {
		reason = fmt.Sprintf("%s; winners that failed: %v", reason, tried)
	}
	return nil, fmt.Errorf("no plant can host the VM: %s: %w", reason, errdefs.ErrResourceExhausted)
}

// auction places a among the plants (market.Place).
func (v *vms) auction(ctx context.Context, a market.Auction) ([]market.Bid, error) {
	bids, open, err := market.Place(ctx, v.cfg.Etcd, v.registry, a, v.cfg.Shortlist, v.cfg.AuctionDeadline)
	if open {
		v.log.Info("no invited plant could host the VM; every plant was asked", zap.String("auction", a.ID))
	}
	return bids, err
}

func mergeLabels(a, b map[string]string) map[string]string {
	if len(b) == 0 {
		return a
	}
	if a == nil {
		a = map[string]string{}
	}
	for k, v := range b {
		a[k] = v
	}
	return a
}

// createOn asks one plant to create the VM, relaying its progress.
func (v *vms) createOn(ctx context.Context, b market.Bid, req *shopv1.CreateVMRequest, rec *record, send progress) (*computev1.ClassAd, error) {
	c, err := v.plants.get(b.Addr)
	if err != nil {
		return nil, err
	}
	labels := mergeLabels(map[string]string{}, req.Labels)
	if req.NetworkDomain != "" {
		labels["domain"] = req.NetworkDomain
	}
	cred, err := v.cfg.dataCredential(rec, req.Config)
	if err != nil {
		return nil, err
	}
	nw, err := v.attachment(ctx, rec, req.NetworkDomain, b.Plant)
	if err != nil {
		return nil, err
	}
	disk, err := v.rootDisk(ctx, rec, req.Persistent) // verbs.go
	if err != nil {
		return nil, err
	}
	stream, err := c.CreateVM(ctx, &computev1.CreateVMRequest{
		VmId: rec.VMID, Owner: rec.Owner, Image: rec.Image, Hardware: req.Hardware, Config: req.Config, Labels: labels,
		DataCredential: cred, Network: nw, PersistentDisk: disk,
	})
	if err != nil {
		return nil, err
	}
	return untilClassAd(stream.Recv, func(p *computev1.CreateVMProgress) {
		send(&shopv1.CreateVMProgress{Stage: "creating", State: p.State, Message: b.Plant + ": " + p.Message})
	})
}

// untilClassAd receives a creation's progress (each) up to the message
// that carries the classad.
func untilClassAd[P interface{ GetClassad() *computev1.ClassAd }](recv func() (P, error), each func(P)) (*computev1.ClassAd, error) {
	for {
		p, err := recv()
		if err != nil {
			return nil, err
		}
		if ad := p.GetClassad(); ad != nil {
			return ad, nil
		}
		each(p)
	}
}

// get returns a VM's classad (see view).
func (v *vms) get(ctx context.Context, r *record) (*computev1.ClassAd, error) {
	driven, err := v.store.claimed(ctx, drivingPrefix+r.VMID)
	if err != nil {
		return nil, err
	}
	return v.view(ctx, r, driven), nil
}

// list returns the classads of the VMs whose owner passes sees.
func (v *vms) list(ctx context.Context, sees func(owner string) bool) ([]*computev1.ClassAd, error) {
	recs, err := v.store.vms(ctx)
	if err != nil {
		return nil, err
	}
	driven, err := v.store.claimed(ctx, drivingPrefix)
	if err != nil {
		return nil, err
	}
	var out []*computev1.ClassAd
	for _, r := range recs {
		if sees(r.Owner) {
			out = append(out, v.view(ctx, r, driven))
		}
	}
	return out, nil
}

// destroy destroys a VM on its plant and removes its records. A lost VM's
// records go at once; its plant destroys it when it is back (lost.go).
func (v *vms) destroy(ctx context.Context, r *record) error {
	switch {
	case r.PlantAddr == "":
	case v.lost(r):
		if err := v.store.orderDestroy(ctx, r.Plant, r.VMID); err != nil {
			return err
		}
	default:
		c, err := v.plants.get(r.PlantAddr)
		if err != nil {
			return err
		}
		if _, err := c.DestroyVM(ctx, &computev1.DestroyVMRequest{VmId: r.VMID}); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("plant %s: %w", r.Plant, err)
		}
	}
	if err := v.deleteImages(ctx, r); err != nil { // verbs.go
		return err
	}
	if err := v.releaseLease(ctx, r.VMID); err != nil {
		return err
	}
	return v.store.remove(ctx, r)
}
