package shop

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/market"
)

// The verbs that move a VM's state: suspend, resume, publish. Each holds
// the VM's driving claim while it runs (one verb on a VM at a time, and a
// shop that dies lets go with its lease), re-reads the record under it,
// and records its outcome only once the plant answered: until then the
// record says what was true before (RUNNING on its plant, or SUSPENDED),
// so a failure part-way leaves the VM as it was. The record keeps the last
// verb's request id: a retry with it answers the same result.
//
// A resume records the plant it tries before it asks it, so a retry after
// a failure asks that plant first and never starts a second copy of the
// VM (two machines on one persistent disk) elsewhere.

const (
	stateSuspended = computev1.VMState_VM_STATE_SUSPENDED

	verbSuspend = "suspend"
	verbResume  = "resume"
	verbPublish = "publish"
)

// verbRecord is the last verb done on a VM.
type verbRecord struct {
	Kind      string `json:"kind"`
	RequestID string `json:"request_id"`
	// Of a publish: the image and how it went.
	Image          string `json:"image,omitempty"`
	PausedNanos    int64  `json:"paused_nanos,omitempty"`
	PublishedBytes uint64 `json:"published_bytes,omitempty"`
}

// rootDiskName is the persistent root disk the shop makes for a VM.
func rootDiskName(vmID string) string { return vmID + "-root" }

// rootDisk makes (or finds, on a retry) a persistent VM's root disk from
// its golden image: nothing is copied, unwritten blocks read the golden's.
// It is the owner's (imagev1.OwnerLabel). "" for a VM that is not
// persistent.
func (v *vms) rootDisk(ctx context.Context, rec *record, persistent bool) (string, error) {
	if !persistent {
		return "", nil
	}
	name := rootDiskName(rec.VMID)
	if rec.RootDisk != name {
		// Recorded first: a destroy deletes it, whatever happens next.
		rec.RootDisk = name
		if err := v.store.putVM(ctx, rec); err != nil {
			return "", err
		}
	}
	_, err := v.cfg.Images.API.CreateDisk(ctx, &imagev1.CreateDiskRequest{Name: name, SourceImage: rec.Image,
		Labels: map[string]string{imagev1.OwnerLabel: rec.Owner, imagev1.VMLabel: rec.VMID}})
	if errdefs.IsAlreadyExists(err) {
		m, gerr := v.cfg.Images.API.GetImage(ctx, &imagev1.GetImageRequest{Name: name})
		if gerr != nil {
			return "", gerr
		}
		if l := m.GetManifest().GetAttributes().GetLabels(); l[imagev1.VMLabel] != rec.VMID || m.GetManifest().BaseImage != rec.Image {
			return "", fmt.Errorf("image %q exists and is not the root disk of %s from %s: %w", name, rec.VMID, rec.Image, errdefs.ErrAlreadyExists)
		}
		return name, nil // a retry: the disk of the first attempt
	}
	if err != nil {
		return "", fmt.Errorf("persistent root disk %s: %w", name, err)
	}
	return name, nil
}

// deleteImages removes what the shop made for a VM that is destroyed: its
// persistent root disk and its suspended state. A missing one is fine (a
// retried destroy).
func (v *vms) deleteImages(ctx context.Context, r *record) error {
	var names []string
	if ad := r.classad(); r.State == stateSuspended && ad.SuspendedImage != "" {
		names = append(names, ad.SuspendedImage)
	}
	if r.RootDisk != "" {
		names = append(names, r.RootDisk)
	}
	if r.SpentState != "" {
		names = append(names, r.SpentState)
	}
	for _, n := range names {
		if _, err := v.cfg.Images.API.DeleteImage(ctx, &imagev1.DeleteImageRequest{Name: n}); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("vm %s: delete its image %s (the VM is kept; retry): %w", r.VMID, n, err)
		}
	}
	return nil
}

// exclusive holds a VM's driving claim (waiting for another holder to let
// go) until release.
func (v *vms) exclusive(ctx context.Context, vmID string) (release func(), err error) {
	key := drivingPrefix + vmID
	for {
		ok, rev, err := v.store.claim(ctx, key)
		if err != nil {
			return nil, err
		}
		if ok {
			return func() { v.store.release(key) }, nil
		}
		v.store.waitReleased(ctx, key, rev)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
}

// verbStart takes the VM's claim and reads its record; done says a retry
// of the verb (kind, requestID) that already succeeded.
func (v *vms) verbStart(ctx context.Context, vmID, kind, requestID string) (rec *record, done bool, release func(), err error) {
	release, err = v.exclusive(ctx, vmID)
	if err != nil {
		return nil, false, nil, err
	}
	rec, _, err = v.store.vm(ctx, vmID)
	if err != nil {
		release()
		return nil, false, nil, err
	}
	if rec.Verb != nil && rec.Verb.RequestID == requestID {
		if rec.Verb.Kind != kind {
			release()
			return nil, false, nil, fmt.Errorf("request id %q was used for a %s of vm %s; use a new request id: %w", requestID, rec.Verb.Kind, vmID, errdefs.ErrAlreadyExists)
		}
		return rec, true, release, nil
	}
	return rec, false, release, nil
}

// running refuses a VM that is not RUNNING on a live plant, saying what
// to do instead.
func (v *vms) running(rec *record, verb string) error {
	switch {
	case rec.State == stateSuspended:
		return fmt.Errorf("vm %s is suspended (its state is image %s); resume it first (vmgrid vm resume %s): %w", rec.VMID, rec.classad().SuspendedImage, rec.VMID, errdefs.ErrFailedPrecondition)
	case rec.State != stateReady || rec.PlantAddr == "":
		return fmt.Errorf("vm %s is %s, not RUNNING: only a running VM can be %s: %w", rec.VMID, vmStateName(rec.State), verb, errdefs.ErrFailedPrecondition)
	case v.lost(rec):
		return fmt.Errorf("vm %s is LOST (plant %s is gone); destroy it: %w", rec.VMID, rec.Plant, errdefs.ErrFailedPrecondition)
	}
	return nil
}

func vmStateName(s computev1.VMState) string {
	if n, ok := computev1.VMState_name[int32(s)]; ok {
		return n[len("VM_STATE_"):]
	}
	return fmt.Sprint(s)
}

// suspend saves a persistent VM on its plant and records it SUSPENDED.
func (v *vms) suspend(ctx context.Context, req *shopv1.SuspendVMRequest) (*computev1.ClassAd, error) {
	rec, done, release, err := v.verbStart(ctx, req.VmId, verbSuspend, req.RequestId)
	if err != nil {
		return nil, err
	}
	defer release()
	if done {
		return rec.classad(), nil
	}
	if err := v.running(rec, "suspended"); err != nil {
		return nil, err
	}
	ad := rec.classad()
	switch {
	case ad.PersistentDisk == "":
		return nil, fmt.Errorf("vm %s is a clone whose redo log lives on plant %s; only persistent VMs can be suspended (create it with vmgrid vm create --persistent): %w", rec.VMID, rec.Plant, errdefs.ErrFailedPrecondition)
	case ad.Network != nil:
		return nil, fmt.Errorf("vm %s has a network (domain %s); suspending a VM with a NIC is not supported yet: %w", rec.VMID, ad.Network.Domain, errdefs.ErrFailedPrecondition)
	}
	c, err := v.plants.get(rec.PlantAddr)
	if err != nil {
		return nil, err
	}
	sus, err := c.SuspendVM(ctx, &computev1.SuspendVMRequest{VmId: rec.VMID})
	if errdefs.IsNotFound(err) {
		// The plant finished a suspend whose answer this shop never
		// recorded (a shop that died, a lost answer): its state image says.
		sus, err = v.suspendedBefore(ctx, rec, err)
	}
	if err != nil {
		return nil, fmt.Errorf("plant %s: %w", rec.Plant, err)
	}
	sus.Labels = mergeLabels(sus.Labels, ad.Labels)
	spent := rec.SpentState
	rec.State, rec.ClassAd, rec.Plant, rec.PlantAddr, rec.SpentState = stateSuspended, fit(sus), "", "", ""
	rec.Verb = &verbRecord{Kind: verbSuspend, RequestID: req.RequestId}
	if err := v.store.putVM(ctx, rec); err != nil {
		return nil, err
	}
	v.deleteSpent(ctx, spent)
	v.log.Info("VM suspended", zap.String("vm", rec.VMID), zap.String("state_image", sus.SuspendedImage))
	return sus, nil
}

// suspendedBefore finds the state image a finished suspend of rec's VM
// published (the newest), or answers notFound.
func (v *vms) suspendedBefore(ctx context.Context, rec *record, notFound error) (*computev1.ClassAd, error) {
	list, err := v.cfg.Images.API.ListImages(ctx, &imagev1.ListImagesRequest{Kind: imagev1.ListImagesRequest_KIND_GOLDEN,
		Labels: map[string]string{imagev1.SuspendedLabel: rec.VMID}})
	if err != nil {
		return nil, err
	}
	var newest *imagev1.Manifest
	for _, m := range list.Images {
		if newest == nil || m.CreatedUnixNano > newest.CreatedUnixNano {
			newest = m
		}
	}
	if newest == nil {
		return nil, fmt.Errorf("%w; the plant no longer has the VM and no suspended state of it exists: destroy it", notFound)
	}
	ad := rec.classad()
	ad.State, ad.SuspendedImage, ad.Plant, ad.Pid, ad.Error = stateSuspended, newest.Name, "", 0, ""
	return ad, nil
}

// deleteSpent deletes a spent state image (a failure is logged: the
// image is the owner's and hidden from others, and DestroyVM does not know
// it any more).
func (v *vms) deleteSpent(ctx context.Context, name string) {
	if name == "" {
		return
	}
	if _, err := v.cfg.Images.API.DeleteImage(ctx, &imagev1.DeleteImageRequest{Name: name}); err != nil && !errdefs.IsNotFound(err) {
		v.log.Warn("delete a spent suspended state", zap.String("image", name), zap.Error(err))
	}
}

// resume brings a SUSPENDED VM back on req.Plant or the auction's winner.
func (v *vms) resume(ctx context.Context, req *shopv1.ResumeVMRequest, send progress) (*computev1.ClassAd, error) {
	rec, done, release, err := v.verbStart(ctx, req.VmId, verbResume, req.RequestId)
	if err != nil {
		return nil, err
	}
	defer release()
	if done && rec.State == stateReady {
		return rec.classad(), nil
	}
	switch {
	case rec.State == stateReady:
		return nil, fmt.Errorf("vm %s is RUNNING on plant %s; suspend it first (vmgrid vm suspend %s): %w", rec.VMID, rec.Plant, rec.VMID, errdefs.ErrFailedPrecondition)
	case rec.State != stateSuspended:
		return nil, fmt.Errorf("vm %s is %s, not SUSPENDED: only a suspended VM can be resumed: %w", rec.VMID, vmStateName(rec.State), errdefs.ErrFailedPrecondition)
	}
	if rec.PlantAddr != "" {
		if ad, err := v.resumedBefore(ctx, rec, req, send); ad != nil || err != nil {
			return ad, err
		}
	}
	bids, err := v.resumeBids(ctx, rec, req.Plant, send)
	if err != nil {
		return nil, err
	}
	var tried []string
	for _, b := range bids {
		ad, err := v.resumeOn(ctx, rec, b, req.RequestId, send)
		if err == nil {
			return ad, nil
		}
		if req.Plant != "" || !passing(err) && !errdefs.IsNotFound(err) {
			return nil, err
		}
		v.log.Warn("resume failed on the winner; trying the next bid", zap.String("plant", b.Plant), zap.Error(err))
		tried = append(tried, fmt.Sprintf("%s: %v", b.Plant, err))
	}
	return nil, fmt.Errorf("no plant could resume vm %s: %v: %w", rec.VMID, tried, errdefs.ErrResourceExhausted)
}

// resumedBefore asks the plant an earlier resume tried: a VM it runs is
// adopted (or its resume awaited), one it does not have frees the record
// for another plant (nil, nil). A plant that does not answer may run it:
// the resume waits for it rather than risk two copies of one disk.
func (v *vms) resumedBefore(ctx context.Context, rec *record, req *shopv1.ResumeVMRequest, send progress) (*computev1.ClassAd, error) {
	b := market.Bid{Plant: rec.Plant, Addr: rec.PlantAddr}
	c, err := v.plants.get(b.Addr)
	if err != nil {
		return nil, err
	}
	_, err = c.GetVM(ctx, &computev1.GetVMRequest{VmId: rec.VMID})
	switch {
	case err == nil:
		send(&shopv1.CreateVMProgress{Stage: "resuming", Message: "an earlier resume reached plant " + b.Plant})
		return v.resumeOn(ctx, rec, b, req.RequestId, send)
	case errdefs.IsNotFound(err):
		rec.Plant, rec.PlantAddr = "", ""
		return nil, v.store.putVM(ctx, rec)
	}
	return nil, fmt.Errorf("an earlier resume of vm %s reached plant %s, which does not answer (%v); retry when it is back, or destroy the VM: %w",
		rec.VMID, b.Plant, err, errdefs.ErrUnavailable)
}

// resumeBids is the plant named, or the auction's bids for the VM.
func (v *vms) resumeBids(ctx context.Context, rec *record, plant string, send progress) ([]market.Bid, error) {
	if plant != "" {
		p, ok := v.registry.Plant(plant)
		if !ok {
			return nil, fmt.Errorf("plant %q is not registered: %w", plant, errdefs.ErrNotFound)
		}
		return []market.Bid{{Plant: p.Name, Addr: p.Addr}}, nil
	}
	ad := rec.classad()
	hw := ad.GetHardware()
	w := v.cfg.Weights
	a := market.Auction{ID: rec.VMID + "-resume-" + fmt.Sprint(time.Now().UnixNano()), Image: ad.SuspendedImage,
		Arch: hw.GetArch(), VCPUs: hw.GetVcpus(), MemoryMiB: hw.GetMemoryMib(), Weights: &w}
	got, err := v.auction(ctx, a)
	if err != nil {
		return nil, fmt.Errorf("auction: %w: %w", err, errdefs.ErrUnavailable)
	}
	send(&shopv1.CreateVMProgress{Stage: "bidding", Message: fmt.Sprintf("%d bids", len(got)), Bids: protoBids(got)})
	var bids []market.Bid
	for _, b := range got {
		if b.Refusal == "" {
			bids = append(bids, b)
		}
	}
	if len(bids) == 0 {
		return nil, fmt.Errorf("no plant can host vm %s: %s: %w", rec.VMID, market.Refusals(got), errdefs.ErrResourceExhausted)
	}
	return bids, nil
}

// resumeOn resumes the VM on one plant, recording the attempt first, and
// the VM RUNNING there once it is.
func (v *vms) resumeOn(ctx context.Context, rec *record, b market.Bid, requestID string, send progress) (*computev1.ClassAd, error) {
	rec.Plant, rec.PlantAddr = b.Plant, b.Addr
	if err := v.store.putVM(ctx, rec); err != nil {
		return nil, err
	}
	c, err := v.plants.get(b.Addr)
	if err != nil {
		return nil, err
	}
	suspended := rec.classad()
	send(&shopv1.CreateVMProgress{Stage: "resuming", Message: "plant " + b.Plant + " resumes the VM from " + suspended.SuspendedImage})
	stream, err := c.ResumeVM(ctx, &computev1.ResumeVMRequest{Classad: suspended})
	if err != nil {
		return nil, err
	}
	ad, err := untilClassAd(stream.Recv, func(p *computev1.CreateVMProgress) {
		send(&shopv1.CreateVMProgress{Stage: "resuming", State: p.State, Message: b.Plant + ": " + p.Message})
	})
	if err != nil {
		if !passing(err) {
			// The plant refused for good (and undid its attempt): the
			// record is free for another plant.
			rec.Plant, rec.PlantAddr = "", ""
			if perr := v.store.putVM(context.WithoutCancel(ctx), rec); perr != nil {
				v.log.Warn("record a failed resume", zap.String("vm", rec.VMID), zap.Error(perr))
			}
		}
		return nil, fmt.Errorf("plant %s: %w", b.Plant, err)
	}
	ad.Labels = mergeLabels(ad.Labels, suspended.Labels)
	// The state is spent (the disk moves on), but the machine reads its
	// kernel from it: it goes with the next suspend (or the VM).
	rec.State, rec.ClassAd, rec.Error, rec.SpentState = stateReady, fit(ad), "", suspended.SuspendedImage
	rec.Verb = &verbRecord{Kind: verbResume, RequestID: requestID}
	if err := v.store.putVM(ctx, rec); err != nil {
		return nil, err
	}
	v.log.Info("VM resumed", zap.String("vm", rec.VMID), zap.String("plant", b.Plant))
	return ad, nil
}

// publish makes a golden image of a running VM, owned by its owner.
func (v *vms) publish(ctx context.Context, req *shopv1.PublishVMRequest) (*shopv1.PublishVMResponse, error) {
	rec, done, release, err := v.verbStart(ctx, req.VmId, verbPublish, req.RequestId)
	if err != nil {
		return nil, err
	}
	defer release()
	if done {
		return v.published(ctx, rec, rec.Verb)
	}
	// A name in use is refused before any work, unless it is this very
	// request's image (a retry whose answer was lost).
	m, err := v.cfg.Images.API.GetImage(ctx, &imagev1.GetImageRequest{Name: req.Name})
	switch {
	case err == nil && publishedBy(m.GetManifest(), rec, req.RequestId):
		return v.recordPublish(ctx, rec, &verbRecord{Kind: verbPublish, RequestID: req.RequestId, Image: req.Name})
	case err == nil:
		return nil, fmt.Errorf("an image named %q exists; pick another name: %w", req.Name, errdefs.ErrAlreadyExists)
	case !errdefs.IsNotFound(err):
		return nil, fmt.Errorf("image server: %w", err)
	}
	if err := v.running(rec, "published"); err != nil {
		return nil, err
	}
	if ad := rec.classad(); ad.Network != nil {
		return nil, fmt.Errorf("vm %s has a network (domain %s); publishing a VM with a NIC is not supported yet: %w", rec.VMID, ad.Network.Domain, errdefs.ErrFailedPrecondition)
	}
	c, err := v.plants.get(rec.PlantAddr)
	if err != nil {
		return nil, err
	}
	labels := mergeLabels(map[string]string{}, req.Labels)
	labels[imagev1.OwnerLabel], labels[imagev1.RequestLabel] = rec.Owner, req.RequestId
	res, err := c.PublishVM(ctx, &computev1.PublishVMRequest{VmId: rec.VMID, Name: req.Name, Labels: labels})
	if err != nil {
		return nil, fmt.Errorf("plant %s: %w", rec.Plant, err)
	}
	v.log.Info("VM published", zap.String("vm", rec.VMID), zap.String("image", req.Name), zap.Duration("paused", time.Duration(res.PausedNanos)))
	return v.recordPublish(ctx, rec, &verbRecord{Kind: verbPublish, RequestID: req.RequestId, Image: req.Name,
		PausedNanos: res.PausedNanos, PublishedBytes: res.PublishedBytes})
}

// publishedBy says whether m is the image rec's VM published for requestID.
func publishedBy(m *imagev1.Manifest, rec *record, requestID string) bool {
	l := m.GetAttributes().GetLabels()
	return l[imagev1.OwnerLabel] == rec.Owner && l[imagev1.VMLabel] == rec.VMID && l[imagev1.RequestLabel] == requestID
}

func (v *vms) recordPublish(ctx context.Context, rec *record, vr *verbRecord) (*shopv1.PublishVMResponse, error) {
	rec.Verb = vr
	if err := v.store.putVM(ctx, rec); err != nil {
		return nil, err
	}
	return v.published(ctx, rec, vr)
}

// published is a publish's answer.
func (v *vms) published(ctx context.Context, rec *record, vr *verbRecord) (*shopv1.PublishVMResponse, error) {
	m, err := v.cfg.Images.API.GetImage(ctx, &imagev1.GetImageRequest{Name: vr.Image})
	if err != nil {
		return nil, fmt.Errorf("the published image %s: %w", vr.Image, err)
	}
	return &shopv1.PublishVMResponse{Image: m.Manifest, Classad: rec.classad(), PausedNanos: vr.PausedNanos, PublishedBytes: vr.PublishedBytes}, nil
}

// The gRPC adapter of the verbs (service.go's pattern): the owner first,
// then the logic. The verbs go on when the caller goes away, as CreateVM.

func (s *Shop) verbContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), 15*time.Minute)
}

// SuspendVM implements ShopService.SuspendVM.
func (s *Shop) SuspendVM(ctx context.Context, req *shopv1.SuspendVMRequest) (*computev1.ClassAd, error) {
	if _, _, err := s.owned(ctx, req.VmId); err != nil {
		return nil, err
	}
	dctx, cancel := s.verbContext(ctx)
	defer cancel()
	return s.vms.suspend(dctx, req)
}

// ResumeVM implements ShopService.ResumeVM.
func (s *Shop) ResumeVM(req *shopv1.ResumeVMRequest, stream shopv1.ShopService_ResumeVMServer) error {
	ctx := stream.Context()
	if _, _, err := s.owned(ctx, req.VmId); err != nil {
		return err
	}
	start := time.Now()
	send := func(p *shopv1.CreateVMProgress) {
		p.ElapsedNanos = int64(time.Since(start))
		_ = stream.Send(p)
	}
	dctx, cancel := s.verbContext(ctx)
	defer cancel()
	ad, err := s.vms.resume(dctx, req, send)
	if err != nil {
		return err
	}
	send(&shopv1.CreateVMProgress{Stage: "ready", Message: "resumed on " + ad.Plant, State: ad.State, Image: ad.Image, Classad: ad})
	return nil
}

// PublishVM implements ShopService.PublishVM.
func (s *Shop) PublishVM(ctx context.Context, req *shopv1.PublishVMRequest) (*shopv1.PublishVMResponse, error) {
	if _, _, err := s.owned(ctx, req.VmId); err != nil {
		return nil, err
	}
	dctx, cancel := s.verbContext(ctx)
	defer cancel()
	return s.vms.publish(dctx, req)
}
