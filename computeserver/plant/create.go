package plant

import (
	"context"
	"fmt"
	"path/filepath"
	"runtime"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/dag"
)

// source is what a VM is made from: a golden image, or a suspended VM's
// state image.
type source struct {
	image    string
	manifest *imagev1.Manifest
	config   *VMConfig
	// persistent root disk (FUSE path) instead of a redo log.
	rootDisk string
	diskName string
	// profile is the image's working-set profile, asked for as the
	// creation started (profile.go; nil: not asked).
	profile *profileLookup
}

// CreateVM makes a VM from a golden image.
func (p *Plant) CreateVM(ctx context.Context, req *computev1.CreateVMRequest, progress Progress) (*computev1.ClassAd, error) {
	plan, diskMiB, err := p.plan(req.Config)
	if err != nil {
		return nil, err
	}
	if err := p.checkStaging(plan, req.DataCredential); err != nil {
		return nil, err
	}
	id := req.VmId
	if id == "" {
		id = newID()
	}
	progress(computev1.VMState_VM_STATE_FETCHING, "reading the image's manifest and configuration")
	profile := p.lookupProfile(ctx, req.Image) // in parallel: one round trip less before the restore
	src, err := p.source(ctx, req.Image)
	if err != nil {
		return nil, err
	}
	src.profile = profile
	if src.manifest.Writable {
		return nil, fmt.Errorf("%q is a persistent disk, not a golden image; pass it as persistent_disk: %w", req.Image, errdefs.ErrInvalidArgument)
	}
	hw, err := p.hardware(req.Hardware, src)
	if err != nil {
		return nil, err
	}
	// A plant's request always names its image (the shop matched it, or an
	// operator chose it): the image's performed actions are accepted.
	plan = plan.Accept(performed(src.manifest))
	if req.PersistentDisk != "" {
		if err := p.persistentRoot(ctx, src, req.PersistentDisk, req.Image); err != nil {
			return nil, err
		}
	}
	ad := &computev1.ClassAd{
		VmId: id, Plant: p.cfg.Name, Image: req.Image, Owner: req.Owner, Hardware: hw,
		State: computev1.VMState_VM_STATE_FETCHING, CreatedUnixNano: time.Now().UnixNano(),
		PersistentDisk: req.PersistentDisk, Labels: req.Labels, Network: req.Network, LoginUser: loginUser(req.Config),
	}
	return p.claimAndBuild(ctx, ad, req.DataCredential, diskMiB, src, plan, progress)
}

// ResumeVM brings back a suspended persistent VM.
func (p *Plant) ResumeVM(ctx context.Context, req *computev1.ResumeVMRequest, progress Progress) (*computev1.ClassAd, error) {
	old := req.Classad
	plan, diskMiB, err := p.plan(req.Config)
	if err != nil {
		return nil, err
	}
	if err := p.checkStaging(plan, ""); err != nil {
		return nil, err
	}
	progress(computev1.VMState_VM_STATE_FETCHING, "reading the suspended state")
	src, err := p.source(ctx, old.SuspendedImage)
	if err != nil {
		return nil, err
	}
	if err := p.persistentRoot(ctx, src, old.PersistentDisk, ""); err != nil {
		return nil, err
	}
	ad := proto.Clone(old).(*computev1.ClassAd)
	ad.Plant, ad.State, ad.Error, ad.Pid, ad.Actions = p.cfg.Name, computev1.VMState_VM_STATE_FETCHING, "", 0, nil
	ad.SuspendedImage = "" // running again: the state image is spent
	ad.CreatedUnixNano = time.Now().UnixNano()
	if ad.Hardware == nil {
		ad.Hardware = &computev1.Hardware{}
	}
	ad.Hardware.MemoryMib = uint64(src.config.Spec.MemoryMiB)
	return p.claimAndBuild(ctx, ad, "", diskMiB, src, plan, progress)
}

// plan derives a request's plan and checks up front that the plant has the
// disk space its host actions need.
func (p *Plant) plan(d *computev1.ConfigDAG) (*dag.Plan, uint64, error) {
	plan, err := dag.New(d)
	if err != nil {
		return nil, 0, fmt.Errorf("config: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	need := hostDiskMiB(plan)
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.diskRoomLocked(need); err != nil {
		return nil, 0, err
	}
	return plan, need, nil
}

// claimAndBuild registers the VM (with the data credential its stage-in
// and stage-out present) and sends it down the production line, or waits
// for the creation a retried request started before.
func (p *Plant) claimAndBuild(ctx context.Context, ad *computev1.ClassAd, dataCred string, diskMiB uint64, src *source, plan *dag.Plan, progress Progress) (*computev1.ClassAd, error) {
	v, fresh, err := p.claim(ad.VmId, ad, diskMiB)
	if err != nil {
		return nil, err
	}
	if !fresh {
		return v.wait(ctx)
	}
	v.mu.Lock()
	v.dataCred = dataCred
	v.mu.Unlock()
	return p.build(ctx, v, src, plan, progress)
}

// build runs the production line for a claimed VM. On failure everything
// is undone and the VM forgotten.
func (p *Plant) build(ctx context.Context, v *vm, src *source, plan *dag.Plan, progress Progress) (*computev1.ClassAd, error) {
	l := &line{
		p: p, v: v, src: src, plan: plan, progress: progress, start: time.Now(), fetched0: p.fetched(),
		log: p.log.With(zap.String("vm", v.ad.VmId), zap.String("image", src.image)),
	}
	err := l.run(ctx)
	if err != nil {
		p.mu.Lock()
		delete(p.vms, v.ad.VmId)
		p.mu.Unlock()
		v.err = err
	}
	close(v.ready)
	if err != nil {
		return nil, err
	}
	return l.ad, nil
}

func performed(m *imagev1.Manifest) []string {
	var out []string
	for _, a := range m.GetAttributes().GetActions() {
		out = append(out, a.Digest)
	}
	return out
}

// source reads an image's manifest and vm.json through the data plane.
func (p *Plant) source(ctx context.Context, image string) (*source, error) {
	m, err := p.cfg.Proxy.Image(ctx, image)
	if err != nil {
		return nil, err
	}
	f, err := p.cfg.Proxy.Open(ctx, image, ConfigFile)
	if errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("image %q has no %s, so this plant cannot run it: %w", image, ConfigFile, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		return nil, err // the upstream away: Unavailable, not the image's fault
	}
	b := make([]byte, f.Size())
	if _, err := f.ReadAt(ctx, b, 0); err != nil {
		return nil, err
	}
	cfg, err := decodeConfig(b)
	if err != nil {
		return nil, fmt.Errorf("image %q: %w: %w", image, err, errdefs.ErrFailedPrecondition)
	}
	return &source{image: image, manifest: m, config: cfg}, nil
}

// persistentRoot makes src boot from a persistent disk. Booting a golden
// memory state over a persistent disk is only consistent while the disk is
// still what the golden image was (generation 0).
func (p *Plant) persistentRoot(ctx context.Context, src *source, disk, golden string) error {
	dm, err := p.cfg.Proxy.Image(ctx, disk)
	if err != nil {
		return err
	}
	if !dm.Writable {
		return fmt.Errorf("%q is a golden image, not a persistent disk: %w", disk, errdefs.ErrInvalidArgument)
	}
	if golden != "" && (dm.BaseImage != golden || dm.Generation != 0) {
		return fmt.Errorf("disk %q (from %q, generation %d) is not a fresh copy of %q, so %q's memory state does not fit it; resume the VM from its suspended state instead: %w",
			disk, dm.BaseImage, dm.Generation, golden, golden, errdefs.ErrFailedPrecondition)
	}
	src.diskName = disk
	src.rootDisk = filepath.Join(p.cfg.Mountpoint, disk, dm.Files[0].Name)
	return nil
}

func (p *Plant) hardware(h *computev1.Hardware, src *source) (*computev1.Hardware, error) {
	img := src.manifest.GetAttributes()
	out := &computev1.Hardware{Arch: img.GetArch(), Vcpus: uint32(src.config.Spec.VCPUs), MemoryMib: uint64(src.config.Spec.MemoryMiB)}
	if h == nil {
		return out, nil
	}
	if h.Arch != "" && h.Arch != out.Arch {
		return nil, fmt.Errorf("image %q is %s, the request asks for %s: %w", src.image, out.Arch, h.Arch, errdefs.ErrFailedPrecondition)
	}
	if h.Arch != "" && h.Arch != runtime.GOARCH && !(h.Arch == "x86_64" && runtime.GOARCH == "amd64") {
		return nil, fmt.Errorf("plant %s runs %s guests only, not %s: %w", p.cfg.Name, "x86_64", h.Arch, errdefs.ErrFailedPrecondition)
	}
	// A memory state restores only into the machine it was saved from.
	if h.Vcpus != 0 && h.Vcpus != out.Vcpus || h.MemoryMib != 0 && h.MemoryMib != out.MemoryMib {
		return nil, fmt.Errorf("image %q was saved with %d vCPUs and %d MiB; a clone has the same (asked for %d vCPUs, %d MiB): %w",
			src.image, out.Vcpus, out.MemoryMib, h.Vcpus, h.MemoryMib, errdefs.ErrFailedPrecondition)
	}
	if out.MemoryMib > p.cfg.MemoryMiB {
		return nil, fmt.Errorf("plant %s gives guests at most %d MiB: %w", p.cfg.Name, p.cfg.MemoryMiB, errdefs.ErrResourceExhausted)
	}
	return out, nil
}
