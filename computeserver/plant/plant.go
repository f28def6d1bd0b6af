// Package plant is the production line of a compute server (VMPlants §4.1,
// GVFS §3.2.3): it turns a golden image into a running, configured VM.
//
// A clone gets its own directory holding a qcow2 redo log whose backing
// file is the golden disk on the FUSE view (nothing is copied), the QEMU
// sockets and its console log. Its memory state is read through the FUSE
// view when QEMU restores it. Then the guest agent sets the clock and runs
// the configuration actions the golden image has not performed, in
// topological order; the result is a classad.
//
// A persistent VM boots from a persistent disk (read-write on the FUSE view,
// written back to the image server); SuspendVM publishes its memory state as
// an image so ResumeVM can bring it back on any plant (GVFS scenario 1).
package plant

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imageserver"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/dag"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Config configures a Plant.
type Config struct {
	// Name of the plant in classads.
	Name string
	// Dir holds one directory per VM (keep it short: unix sockets live
	// there).
	Dir string
	// Mountpoint of the FUSE view of Proxy.
	Mountpoint string
	Proxy      *gvfs.Proxy
	Driver     vmm.Driver
	// MemoryMiB is what the plant may give to guests (0: 80% of RAM).
	MemoryMiB uint64
	// DataToken is a service token of the data servers (stage-in/out act
	// for the VM's owner with it); DataTLS secures those connections.
	DataToken string
	DataTLS   services.TLSFiles
	Log       *zap.Logger
}

// Plant runs VMs.
type Plant struct {
	cfg Config
	log *zap.Logger

	mu     sync.Mutex
	vms    map[string]*vm
	images map[string]uint64 // bytes fetched for clones of each image
}

type vm struct {
	mu      sync.Mutex
	ad      *computev1.ClassAd
	m       vmm.Machine
	agent   *agent.Client
	dir     string
	ready   chan struct{} // closed when creation ended
	err     error         // creation error
	rootRW  string        // FUSE path of a persistent root disk
	created time.Time
	// resumeKernel: the machine was restored with the image's resume
	// kernel (VMConfig.ResumeKernel), not its boot kernel.
	resumeKernel bool

	hotplugged int // disks hot-plugged so far

	dataDisk, dataMount, dataServer string // stage-in data disk (host path), its guest mount, its data server
}

// New opens a plant. VMs left running by a previous process are stopped
// and their directories removed: a plant never leaks a process or a file.
func New(cfg Config) (*Plant, error) {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = hostMemoryMiB() * 8 / 10
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, err
	}
	p := &Plant{cfg: cfg, log: cfg.Log, vms: map[string]*vm{}, images: map[string]uint64{}}
	p.reap()
	return p, nil
}

func (p *Plant) reap() {
	ents, _ := os.ReadDir(p.cfg.Dir)
	for _, e := range ents {
		dir := filepath.Join(p.cfg.Dir, e.Name())
		if b, err := os.ReadFile(filepath.Join(dir, "classad.json")); err == nil {
			ad := &computev1.ClassAd{}
			if protojson.Unmarshal(b, ad) == nil && ad.Pid > 0 {
				if syscall.Kill(-int(ad.Pid), syscall.SIGKILL) == nil {
					p.log.Warn("stopped a VM left by a previous run", zap.String("vm", ad.VmId), zap.Int32("pid", ad.Pid))
				}
			}
		}
		os.RemoveAll(dir)
	}
}

// Progress receives CreateVM's progress.
type Progress func(state computev1.VMState, msg string)

func newID() string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	return "vm-" + hex.EncodeToString(b[:])
}

func (p *Plant) lookup(id string) (*vm, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	v := p.vms[id]
	if v == nil {
		return nil, fmt.Errorf("vm %q is not on plant %s: %w", id, p.cfg.Name, errdefs.ErrNotFound)
	}
	return v, nil
}

// claim registers a new VM id, or returns the existing VM of that id (a
// retried request).
func (p *Plant) claim(id string, ad *computev1.ClassAd) (*vm, bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if v := p.vms[id]; v != nil {
		return v, false, nil
	}
	var used uint64
	for _, v := range p.vms {
		used += v.ad.GetHardware().GetMemoryMib()
	}
	if need := ad.Hardware.MemoryMib; used+need > p.cfg.MemoryMiB {
		return nil, false, fmt.Errorf("plant %s has %d MiB of guest memory left, the VM needs %d MiB: %w", p.cfg.Name, p.cfg.MemoryMiB-min(used, p.cfg.MemoryMiB), need, errdefs.ErrResourceExhausted)
	}
	v := &vm{ad: ad, dir: filepath.Join(p.cfg.Dir, id), ready: make(chan struct{}), created: time.Now()}
	p.vms[id] = v
	return v, true, nil
}

// wait returns the classad of a VM whose creation another call started.
func (v *vm) wait(ctx context.Context) (*computev1.ClassAd, error) {
	select {
	case <-v.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if v.err != nil {
		return nil, v.err
	}
	return v.classad(), nil
}

func (v *vm) classad() *computev1.ClassAd {
	v.mu.Lock()
	defer v.mu.Unlock()
	return proto.Clone(v.ad).(*computev1.ClassAd)
}

// source is what a VM is made from: a golden image, or a suspended VM's
// state image.
type source struct {
	image    string
	manifest *imagev1.Manifest
	config   *VMConfig
	// persistent root disk (FUSE path) instead of a redo log.
	rootDisk string
	diskName string
}

// CreateVM makes a VM from a golden image.
func (p *Plant) CreateVM(ctx context.Context, req *computev1.CreateVMRequest, progress Progress) (*computev1.ClassAd, error) {
	if err := dag.Validate(req.Config); err != nil {
		return nil, fmt.Errorf("config: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	id := req.VmId
	if id == "" {
		id = newID()
	}
	progress(computev1.VMState_VM_STATE_FETCHING, "reading the image's manifest and configuration")
	src, err := p.source(ctx, req.Image)
	if err != nil {
		return nil, err
	}
	if src.manifest.Writable {
		return nil, fmt.Errorf("%q is a persistent disk, not a golden image; pass it as persistent_disk: %w", req.Image, errdefs.ErrInvalidArgument)
	}
	hw, err := p.hardware(req.Hardware, src)
	if err != nil {
		return nil, err
	}
	remaining, err := dag.Match(req.GetConfig().GetActions(), performed(src.manifest))
	if err != nil {
		return nil, fmt.Errorf("image %q does not match the configuration: %v: %w", req.Image, err, errdefs.ErrFailedPrecondition)
	}
	if req.PersistentDisk != "" {
		if err := p.persistentRoot(ctx, src, req.PersistentDisk, req.Image); err != nil {
			return nil, err
		}
	}
	ad := &computev1.ClassAd{
		VmId: id, Plant: p.cfg.Name, Image: req.Image, Owner: req.Owner, Hardware: hw,
		State: computev1.VMState_VM_STATE_FETCHING, CreatedUnixNano: time.Now().UnixNano(),
		PersistentDisk: req.PersistentDisk, Labels: req.Labels,
	}
	v, fresh, err := p.claim(id, ad)
	if err != nil {
		return nil, err
	}
	if !fresh {
		return v.wait(ctx)
	}
	return p.build(ctx, v, src, req.GetConfig().GetActions(), remaining, progress)
}

// ResumeVM brings back a suspended persistent VM.
func (p *Plant) ResumeVM(ctx context.Context, req *computev1.ResumeVMRequest, progress Progress) (*computev1.ClassAd, error) {
	old := req.Classad
	if err := dag.Validate(req.Config); err != nil {
		return nil, fmt.Errorf("config: %v: %w", err, errdefs.ErrInvalidArgument)
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
	ad.CreatedUnixNano = time.Now().UnixNano()
	if ad.Hardware == nil {
		ad.Hardware = &computev1.Hardware{}
	}
	ad.Hardware.MemoryMib = uint64(src.config.Spec.MemoryMiB)
	v, fresh, err := p.claim(old.VmId, ad)
	if err != nil {
		return nil, err
	}
	if !fresh {
		return v.wait(ctx)
	}
	actions := req.GetConfig().GetActions()
	ordered, _ := dag.Order(actions)
	return p.build(ctx, v, src, actions, ordered, progress)
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
	if err != nil {
		return nil, fmt.Errorf("image %q has no %s, so this plant cannot run it: %w", image, ConfigFile, errdefs.ErrFailedPrecondition)
	}
	b := make([]byte, f.Size())
	if _, err := f.ReadAt(ctx, b, 0); err != nil {
		return nil, err
	}
	cfg, err := decodeConfig(b)
	if err != nil {
		return nil, fmt.Errorf("image %q: %v: %w", image, err, errdefs.ErrFailedPrecondition)
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

// build is the production line proper. On failure everything is undone.
func (p *Plant) build(ctx context.Context, v *vm, src *source, all, remaining []*computev1.Action, progress Progress) (ad *computev1.ClassAd, err error) {
	start := time.Now()
	id := v.ad.VmId
	log := p.log.With(zap.String("vm", id), zap.String("image", src.image))
	fetched0 := p.fetched()
	defer func() {
		if err != nil {
			log.Warn("VM creation failed; cleaning up", zap.Error(err))
			p.teardown(v)
			p.mu.Lock()
			delete(p.vms, id)
			p.mu.Unlock()
			v.err = err
		}
		close(v.ready)
	}()
	if err := os.MkdirAll(v.dir, 0o755); err != nil {
		return nil, err
	}
	spec := src.config.Spec
	spec.Name, spec.Dir = id, v.dir
	kernel, initrd := src.config.Kernel, src.config.Initrd
	if src.config.Memory != "" && src.config.ResumeKernel != "" {
		// A restore: the kernel and initramfs are in the memory state.
		kernel, initrd = src.config.ResumeKernel, ""
		v.resumeKernel = true
	}
	spec.Kernel = filepath.Join(p.cfg.Mountpoint, src.image, kernel)
	if initrd != "" {
		spec.Initrd = filepath.Join(p.cfg.Mountpoint, src.image, initrd)
	}
	spec.Channels = []vmm.Channel{{Name: AgentChannel, Socket: filepath.Join(v.dir, "agent.sock")}}
	p.prefetch(ctx, src.image, kernel, src.config.Memory)
	disk := spec.Disks[0]
	if src.rootDisk != "" {
		disk.Path, disk.Format = src.rootDisk, vmm.Raw
		v.rootRW = src.rootDisk
	} else {
		// The redo log: a qcow2 overlay backed by the golden disk on the view.
		disk.Path, disk.Format = filepath.Join(v.dir, "redo.qcow2"), vmm.QCOW2
		backing := filepath.Join(p.cfg.Mountpoint, src.image, src.config.Root)
		if err := qemuImg(ctx, "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", disk.Path); err != nil {
			return nil, err
		}
	}
	spec.Disks = append([]vmm.Disk{disk}, spec.Disks[1:]...)

	v.setState(computev1.VMState_VM_STATE_RESTORING)
	var m vmm.Machine
	if src.config.Memory != "" {
		progress(computev1.VMState_VM_STATE_RESTORING, "restoring the memory state through the FUSE view")
		m, err = vmm.Restore(ctx, p.cfg.Driver, spec, vmm.Incoming{Path: filepath.Join(p.cfg.Mountpoint, src.image, src.config.Memory)})
	} else {
		progress(computev1.VMState_VM_STATE_RESTORING, "booting (the image has no memory state)")
		m, err = p.cfg.Driver.Start(ctx, spec)
	}
	if err != nil {
		return nil, err
	}
	v.mu.Lock()
	v.m = m
	v.ad.Pid = int32(m.Pid())
	v.ad.ConsoleLog = filepath.Join(v.dir, "console.log")
	v.ad.AgentSocket = spec.Channels[0].Socket
	v.mu.Unlock()

	progress(computev1.VMState_VM_STATE_CONFIGURING, "waiting for the guest agent")
	v.setState(computev1.VMState_VM_STATE_CONFIGURING)
	actx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	ac, err := agent.Dial(actx, spec.Channels[0].Socket)
	if err == nil {
		err = ac.WaitReady(actx)
	}
	cancel()
	if err != nil {
		return nil, fmt.Errorf("the guest agent of %s did not answer: %v: %w", id, err, errdefs.ErrUnavailable)
	}
	v.agent = ac
	// The clock stood still since the memory state was saved.
	if resp, err := ac.Do(ctx, agent.Request{Op: agent.OpSetTime, UnixNano: time.Now().UnixNano()}); err != nil {
		log.Warn("could not set the guest clock", zap.Error(err))
	} else if resp.Error != "" {
		log.Warn("could not set the guest clock", zap.String("agent", resp.Error))
	}

	digests, _ := dag.Digests(all)
	todo := map[string]bool{}
	for _, a := range remaining {
		todo[a.Id] = true
	}
	ordered, _ := dag.Order(all)
	var results []*computev1.ActionResult
	for _, a := range ordered {
		if !todo[a.Id] {
			results = append(results, &computev1.ActionResult{Id: a.Id, Digest: digests[a.Id], Skipped: true})
			continue
		}
		progress(computev1.VMState_VM_STATE_CONFIGURING, fmt.Sprintf("action %s (%s)", a.Id, dag.Kind(a)))
		r := p.runAction(ctx, v, a)
		r.Digest = digests[a.Id]
		if r.Error != "" && len(a.OnError) > 0 {
			handlers, _ := dag.Order(a.OnError)
			ok := true
			for _, h := range handlers {
				hr := p.runAction(ctx, v, h)
				hr.Id = a.Id + "/on_error/" + h.Id
				results = append(results, hr)
				if hr.Error != "" {
					ok = false
					break
				}
			}
			if ok {
				r.Recovered = true
			}
		}
		results = append(results, r)
		if r.Error != "" && !r.Recovered {
			return nil, fmt.Errorf("configuration action %q (%s) failed: %s%s: %w", a.Id, dag.Kind(a), r.Error, outputTail(r), errdefs.ErrFailedPrecondition)
		}
	}
	v.mu.Lock()
	v.ad.Actions = results
	v.ad.State = computev1.VMState_VM_STATE_RUNNING
	v.ad.ReadyNanos = int64(time.Since(start))
	v.ad.FetchedBytes = p.fetched() - fetched0
	ad = proto.Clone(v.ad).(*computev1.ClassAd)
	v.mu.Unlock()
	p.mu.Lock()
	p.images[src.image] += ad.FetchedBytes
	p.mu.Unlock()
	p.persist(v)
	log.Info("VM ready", zap.Duration("took", time.Since(start)), zap.Int("actions", len(remaining)), zap.Uint64("fetched_bytes", ad.FetchedBytes))
	progress(computev1.VMState_VM_STATE_RUNNING, "ready")
	return ad, nil
}

// prefetch streams files QEMU reads whole, in the order it reads them (the
// kernel when it starts, then the memory state), one after the other:
// without it a cold plant's link idles while the redo log is made and QEMU
// starts, and again between the two files (0.14 s of a 5.7 s cold clone
// over a 40 ms, 100 Mbit/s WAN, vmgrid bench clone).
// One at a time, as QEMU needs the whole kernel before it reads the memory
// state. A hint: QEMU's own reads report errors.
func (p *Plant) prefetch(ctx context.Context, image string, files ...string) {
	var whole []gvfs.File
	for _, name := range files {
		if name == "" {
			continue
		}
		if f, err := p.cfg.Proxy.Open(ctx, image, name); err == nil && f.Meta().Policy == imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE && f.Size() > 0 {
			whole = append(whole, f)
		}
	}
	if len(whole) == 0 {
		return
	}
	// Bound by ctx: once the VM is made, QEMU has read them.
	go func() {
		var b [1]byte
		for _, f := range whole {
			// The last byte: wait until the whole file is here.
			if _, err := f.ReadAt(ctx, b[:], int64(f.Size())-1); err != nil {
				return
			}
		}
	}()
}

func (p *Plant) fetched() uint64 {
	s := p.cfg.Proxy.Stats()
	return s.FetchedBytes.Load() + p.cfg.Proxy.FileCache().Received()
}

func outputTail(r *computev1.ActionResult) string {
	out := strings.TrimSpace(string(r.Stderr))
	if out == "" {
		out = strings.TrimSpace(string(r.Stdout))
	}
	if out == "" {
		return ""
	}
	return ": " + tail(out, 500)
}

func (v *vm) setState(s computev1.VMState) {
	v.mu.Lock()
	v.ad.State = s
	v.mu.Unlock()
}

func (p *Plant) persist(v *vm) {
	b, err := protojson.Marshal(v.classad())
	if err == nil {
		err = os.WriteFile(filepath.Join(v.dir, "classad.json"), b, 0o644)
	}
	if err != nil {
		p.log.Warn("could not save the classad", zap.String("vm", v.ad.VmId), zap.Error(err))
	}
}

// teardown stops a VM's machine and removes its files.
func (p *Plant) teardown(v *vm) {
	if v.agent != nil {
		v.agent.Close()
	}
	if v.m != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		if err := v.m.Stop(ctx); err != nil {
			p.log.Warn("stop", zap.String("vm", v.ad.VmId), zap.Error(err))
		}
		cancel()
	}
	if err := os.RemoveAll(v.dir); err != nil {
		p.log.Warn("remove VM directory", zap.String("dir", v.dir), zap.Error(err))
	}
}

// GetVM returns a VM's classad.
func (p *Plant) GetVM(id string) (*computev1.ClassAd, error) {
	v, err := p.lookup(id)
	if err != nil {
		return nil, err
	}
	return v.classad(), nil
}

// ListVMs returns the classads of the VMs on this plant (of one owner if
// owner is set), by id.
func (p *Plant) ListVMs(owner string) []*computev1.ClassAd {
	p.mu.Lock()
	vs := make([]*vm, 0, len(p.vms))
	for _, v := range p.vms {
		vs = append(vs, v)
	}
	p.mu.Unlock()
	var out []*computev1.ClassAd
	for _, v := range vs {
		ad := v.classad()
		if owner == "" || ad.Owner == owner {
			out = append(out, ad)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VmId < out[j].VmId })
	return out
}

// Offer is what the plant offers now, for bids.
type Offer struct {
	Name               string
	MemoryMiB, FreeMiB uint64
	Running            int
	Domains            []string          // network domains of running VMs
	Images             map[string]uint64 // bytes held of each image
}

// Offer reports the plant's load and what its caches hold.
func (p *Plant) Offer() Offer {
	p.mu.Lock()
	defer p.mu.Unlock()
	o := Offer{Name: p.cfg.Name, MemoryMiB: p.cfg.MemoryMiB, Running: len(p.vms), Images: map[string]uint64{}}
	var used uint64
	seen := map[string]bool{}
	for _, v := range p.vms {
		used += v.ad.GetHardware().GetMemoryMib()
		if d := v.ad.GetLabels()["domain"]; d != "" && !seen[d] {
			seen[d] = true
			o.Domains = append(o.Domains, d)
		}
	}
	o.FreeMiB = p.cfg.MemoryMiB - min(used, p.cfg.MemoryMiB)
	for k, b := range p.images {
		o.Images[k] = b
	}
	sort.Strings(o.Domains)
	return o
}

// DestroyVM stops a VM and releases everything it had; a persistent VM's
// disk changes are written back first.
func (p *Plant) DestroyVM(ctx context.Context, id string) error {
	v, err := p.lookup(id)
	if err != nil {
		return err
	}
	select {
	case <-v.ready:
	case <-ctx.Done():
		return ctx.Err()
	}
	p.mu.Lock()
	if p.vms[id] != v {
		p.mu.Unlock()
		return fmt.Errorf("vm %q: %w", id, errdefs.ErrNotFound)
	}
	delete(p.vms, id)
	p.mu.Unlock()
	p.teardown(v)
	if v.ad.PersistentDisk != "" {
		if _, err := p.cfg.Proxy.Flush(ctx, v.ad.PersistentDisk); err != nil {
			return fmt.Errorf("vm %s destroyed, but writing back disk %s failed (its blocks stay dirty in the cache and are retried): %w", id, v.ad.PersistentDisk, err)
		}
	}
	p.log.Info("VM destroyed", zap.String("vm", id))
	return nil
}

// Exec runs a command in a VM through its agent.
func (p *Plant) Exec(ctx context.Context, id string, e *computev1.ExecAction) (*computev1.ExecVMResponse, error) {
	v, err := p.lookup(id)
	if err != nil {
		return nil, err
	}
	select {
	case <-v.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if v.agent == nil {
		return nil, fmt.Errorf("vm %q has no agent connection: %w", id, errdefs.ErrFailedPrecondition)
	}
	resp, err := v.agent.Do(ctx, execRequest(e))
	if err != nil {
		return nil, fmt.Errorf("agent of %s: %v: %w", id, err, errdefs.ErrUnavailable)
	}
	return &computev1.ExecVMResponse{ExitCode: int32(resp.ExitCode), Stdout: resp.Stdout, Stderr: resp.Stderr, Results: resp.Results, Error: resp.Error}, nil
}

func execRequest(e *computev1.ExecAction) agent.Request {
	t := time.Duration(e.TimeoutSeconds) * time.Second
	if t == 0 {
		t = 5 * time.Minute
	}
	return agent.Request{Op: agent.OpExec, Argv: e.Argv, Env: e.Env, Dir: e.Dir, Timeout: agent.Duration(t)}
}

// SuspendVM saves a persistent VM: its memory state becomes an image on the
// image server, its disk is written back, and it leaves this plant.
func (p *Plant) SuspendVM(ctx context.Context, id string, images *imageserver.Client) (*computev1.ClassAd, error) {
	v, err := p.lookup(id)
	if err != nil {
		return nil, err
	}
	<-v.ready
	if v.ad.PersistentDisk == "" {
		return nil, fmt.Errorf("vm %q is a clone whose redo log lives on this plant; only persistent VMs (created with persistent_disk) can be suspended: %w", id, errdefs.ErrFailedPrecondition)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.m == nil {
		return nil, fmt.Errorf("vm %q is not running: %w", id, errdefs.ErrFailedPrecondition)
	}
	spec := v.m.Spec()
	mem := filepath.Join(v.dir, MemoryFile)
	if err := v.m.Suspend(ctx, mem); err != nil {
		return nil, err
	}
	if v.agent != nil {
		v.agent.Close()
		v.agent = nil
	}
	v.m = nil
	if _, err := p.cfg.Proxy.Flush(ctx, v.ad.PersistentDisk); err != nil {
		return nil, fmt.Errorf("write-back of %s: %w", v.ad.PersistentDisk, err)
	}
	tmpl := spec
	tmpl.Name, tmpl.Dir, tmpl.Kernel, tmpl.Initrd, tmpl.Incoming = "", "", "", "", nil
	tmpl.Disks = append([]vmm.Disk(nil), spec.Disks...)
	tmpl.Disks[0].Path = ""
	tmpl.Channels = []vmm.Channel{{Name: AgentChannel}}
	cfg := VMConfig{Version: 1, Spec: tmpl, Kernel: KernelFile, Root: RootFile, Memory: MemoryFile}
	kernelName := KernelFile
	if v.resumeKernel {
		// The machine never had the boot kernel: the suspended image, which
		// is only ever restored, carries the resume kernel as its kernel.
		cfg.Kernel, cfg.ResumeKernel, kernelName = ResumeKernelFile, ResumeKernelFile, ResumeKernelFile
	}
	if spec.Initrd != "" {
		cfg.Initrd = InitrdFile
	}
	cfgPath := filepath.Join(v.dir, ConfigFile)
	if err := writeJSON(cfgPath, cfg); err != nil {
		return nil, err
	}
	name := fmt.Sprintf("%s-suspended-%d", id, time.Now().Unix())
	attrs := &imagev1.ImageAttributes{Arch: v.ad.Hardware.GetArch(), Vcpus: uint32(spec.VCPUs), MemoryMib: uint64(spec.MemoryMiB), Parent: v.ad.Image,
		Labels: map[string]string{"suspended-vm": id}}
	files := []imageserver.PublishFile{
		{Name: ConfigFile, Path: cfgPath, Kind: imagev1.FileKind_FILE_KIND_CONFIG},
		{Name: kernelName, Path: spec.Kernel, Kind: imagev1.FileKind_FILE_KIND_KERNEL},
		{Name: MemoryFile, Path: mem, Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE},
	}
	if spec.Initrd != "" {
		files = append(files, imageserver.PublishFile{Name: InitrdFile, Path: spec.Initrd, Kind: imagev1.FileKind_FILE_KIND_INITRD})
	}
	if _, err := images.Publish(ctx, imageserver.PublishSpec{Name: name, Attributes: attrs, Files: files}, nil); err != nil {
		return nil, fmt.Errorf("publish the memory state of %s: %w", id, err)
	}
	os.RemoveAll(v.dir)
	p.mu.Lock()
	delete(p.vms, id)
	p.mu.Unlock()
	v.ad.State = computev1.VMState_VM_STATE_SUSPENDED
	v.ad.SuspendedImage = name
	v.ad.Pid = 0
	p.log.Info("VM suspended", zap.String("vm", id), zap.String("state_image", name))
	return proto.Clone(v.ad).(*computev1.ClassAd), nil
}

// Close stops every VM (persistent disks are written back).
func (p *Plant) Close(ctx context.Context) {
	p.mu.Lock()
	ids := make([]string, 0, len(p.vms))
	for id := range p.vms {
		ids = append(ids, id)
	}
	p.mu.Unlock()
	for _, id := range ids {
		if err := p.DestroyVM(ctx, id); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			p.log.Warn("destroy at shutdown", zap.String("vm", id), zap.Error(err))
		}
	}
}
