package plant

import (
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/dag"
)

// Publishing a running VM (PublishVM): the VM becomes a golden image, the
// way a configured machine becomes a template, and runs on.
//
// The guest's caches are dropped (its file writes reach its disk, and the
// memory state is smaller), then the machine is saved as a suspend would
// save it but left paused: its disks are flushed and QEMU has let go of
// them, so the redo log is copied (a clone's: its written blocks only; a
// persistent disk is folded whole from the FUSE view) and the guest runs
// on. The pause is the save and that copy. Then, with the guest running:
// the redo log is folded into a new root disk over the golden one, and a
// machine whose image has a RAM file (lazy memory) has its RAM split out
// of the saved stream by a helper QEMU that never runs the guest: it loads
// the stream into a shared RAM file and saves the devices alone with
// x-ignore-shared, so clones of the new image restore lazily too. The
// image records its golden image's performed actions and then the VM's
// own (not the ones that failed and were recovered), so requests whose DAG
// starts with them match it (VMPlants §3.2).

// snapshot is a running VM's state saved for publishing.
type snapshot struct {
	dir      string
	spec     vmm.Spec // the machine's
	state    string   // the saved stream (RAM in it unless split)
	root     string   // the folded root disk
	redoCopy string   // a clone's redo log as it was at the save
	paused   time.Duration
}

// PublishVM saves a running VM as the golden image req.Name.
func (p *Plant) PublishVM(ctx context.Context, req *computev1.PublishVMRequest, images *imageclient.Client) (*computev1.PublishVMResponse, error) {
	v, err := p.readyVM(ctx, req.VmId)
	if err != nil {
		return nil, err
	}
	if _, err := images.API.GetImage(ctx, &imagev1.GetImageRequest{Name: req.Name}); err == nil {
		return nil, fmt.Errorf("an image named %q exists; pick another name: %w", req.Name, errdefs.ErrAlreadyExists)
	} else if !errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("image server: %w", err)
	}
	golden, err := p.cfg.Proxy.Image(ctx, v.ad.Image)
	if err != nil {
		return nil, fmt.Errorf("the VM's image %s: %w", v.ad.Image, err)
	}
	v.busy.Lock()
	defer v.busy.Unlock()
	v.mu.Lock()
	m, ac := v.m, v.agent
	v.mu.Unlock()
	if err := publishable(v, m); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(v.dir, "publish-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	log := p.log.With(zap.String("vm", req.VmId), zap.String("image", req.Name))
	snap, err := p.snapshot(ctx, v.ad.VmId, m, ac, dir, log)
	if err != nil {
		return nil, err
	}
	files, err := describePublished(v, snap)
	if err != nil {
		return nil, err
	}
	attrs := publishedAttributes(v, golden, snap, req.Labels)
	res, err := images.Publish(ctx, imageclient.PublishSpec{Name: req.Name, Attributes: attrs, Files: files}, nil)
	if err != nil {
		return nil, fmt.Errorf("publish %s: %w", req.Name, err)
	}
	log.Info("VM published as a golden image", zap.Duration("paused", snap.paused), zap.Uint64("bytes", res.BytesReceived), zap.Int("actions", len(attrs.Actions)))
	return &computev1.PublishVMResponse{Image: req.Name, PausedNanos: int64(snap.paused), PublishedBytes: res.BytesReceived}, nil
}

// readyVM returns a VM once its creation has ended.
func (p *Plant) readyVM(ctx context.Context, id string) (*vm, error) {
	v, err := p.lookup(id)
	if err != nil {
		return nil, err
	}
	select {
	case <-v.ready:
		return v, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// publishable refuses what a golden image cannot carry: a golden machine
// has its root disk and a NIC without a backend, nothing plugged in later.
func publishable(v *vm, m vmm.Machine) error {
	id := v.ad.VmId
	switch {
	case v.ad.Network != nil:
		return fmt.Errorf("vm %q has a network; publishing a VM with a NIC on its domain is not supported yet (create the VM without --domain): %w", id, errdefs.ErrFailedPrecondition)
	case v.hostActions:
		return fmt.Errorf("vm %q ran host actions (attach_disk, stage_in): a golden image carries its root disk only: %w", id, errdefs.ErrFailedPrecondition)
	case m == nil:
		return fmt.Errorf("vm %q is not running: %w", id, errdefs.ErrFailedPrecondition)
	}
	spec := m.Spec()
	switch {
	case len(spec.Disks) != 1:
		return fmt.Errorf("vm %q has %d disks (a cloud-init seed?); a golden image carries its root disk only: %w", id, len(spec.Disks), errdefs.ErrFailedPrecondition)
	case spec.Kernel == "":
		return fmt.Errorf("vm %q booted from firmware (a stock image): make a golden image of its image with vmgrid image build --from instead: %w", id, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// snapshot saves the guest's memory state and its disk at one instant and
// lets the guest run on. v.busy is held.
func (p *Plant) snapshot(ctx context.Context, id string, m vmm.Machine, ac guestAgent, dir string, log *zap.Logger) (*snapshot, error) {
	s := &snapshot{dir: dir, spec: m.Spec(), state: filepath.Join(dir, "mem.full"), root: filepath.Join(dir, RootFile)}
	if ac != nil {
		if err := dropCaches(ctx, ac); err != nil {
			return nil, fmt.Errorf("vm %s: %w: %w", id, err, errdefs.ErrUnavailable)
		}
	}
	disk := s.spec.Disks[0]
	start := time.Now()
	if err := m.Save(ctx, s.state); err != nil {
		return nil, err
	}
	var err error
	if disk.Format == vmm.QCOW2 {
		s.redoCopy = filepath.Join(dir, "redo.qcow2")
		err = run(ctx, "cp", "--sparse=always", disk.Path, s.redoCopy)
	} else {
		err = foldDisk(ctx, disk.Path, string(disk.Format), s.root)
	}
	cerr := m.Continue(ctx)
	s.paused = time.Since(start)
	if cerr != nil {
		return nil, fmt.Errorf("vm %s did not run on after its state was saved: %w", id, cerr)
	}
	if ac != nil {
		if resp, err := ac.Do(ctx, agent.Request{Op: agent.OpSetTime, UnixNano: time.Now().UnixNano()}); err != nil || resp.Error != "" {
			log.Warn("could not set the guest clock after the pause", zap.Error(err))
		}
	}
	if err != nil {
		return nil, fmt.Errorf("copy the disk of %s: %w", id, err)
	}
	log.Info("VM state saved for publishing; the guest runs on", zap.Duration("paused", s.paused))
	if s.redoCopy != "" {
		if err := foldDisk(ctx, s.redoCopy, "qcow2", s.root); err != nil {
			return nil, err
		}
	}
	if s.spec.MemoryFile != nil {
		if err := p.splitRAM(ctx, s); err != nil {
			return nil, fmt.Errorf("split the RAM of %s out of its state: %w", id, err)
		}
	}
	return s, nil
}

// foldDisk writes a disk (a redo log with its backing chain, or a raw
// disk) as one sparse raw file. -U: the file may still be open in QEMU,
// which no longer writes it (it is paused or the file is a copy).
func foldDisk(ctx context.Context, in, format, out string) error {
	return run(ctx, "qemu-img", "convert", "-q", "-U", "-f", format, "-O", "raw", "-S", "4k", in, out)
}

func run(ctx context.Context, name string, args ...string) error {
	b, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", name, err, b)
	}
	return nil
}

// splitRAM turns the saved stream (RAM in it) into a device state and a
// RAM file: a helper machine with the same devices and a shared RAM file
// loads it, paused, and saves again with x-ignore-shared.
func (p *Plant) splitRAM(ctx context.Context, s *snapshot) error {
	hdir := filepath.Join(s.dir, "m")
	if err := os.MkdirAll(hdir, 0o755); err != nil {
		return err
	}
	overlay := filepath.Join(hdir, "disk.qcow2")
	if err := run(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-b", s.root, "-F", "raw", overlay); err != nil {
		return err
	}
	spec := s.spec
	spec.Name, spec.Dir = "publish-"+filepath.Base(s.dir), hdir
	spec.Disks = slices.Clone(spec.Disks)
	spec.Disks[0].Path, spec.Disks[0].Format = overlay, vmm.QCOW2
	spec.Channels = slices.Clone(spec.Channels)
	for i := range spec.Channels {
		spec.Channels[i].Socket = filepath.Join(hdir, fmt.Sprintf("ch%d.sock", i))
	}
	spec.MemoryFile = &vmm.MemoryFile{Path: filepath.Join(s.dir, RAMFile), Share: true}
	spec.Incoming = &vmm.Incoming{Path: s.state}
	m, err := p.cfg.Driver.Start(ctx, spec)
	if err != nil {
		return err
	}
	defer m.Kill() // a no-op once it has quit
	if err := waitPaused(ctx, m); err != nil {
		return err
	}
	state := filepath.Join(s.dir, MemoryFile)
	if err := m.Suspend(ctx, state); err != nil {
		return err
	}
	s.state, s.spec.MemoryFile = state, spec.MemoryFile
	return os.Remove(filepath.Join(s.dir, "mem.full"))
}

// waitPaused waits until a machine started with an incoming state has
// loaded it (it stays paused: nothing runs the guest).
func waitPaused(ctx context.Context, m vmm.Machine) error {
	for {
		st, err := m.Status(ctx)
		if err != nil {
			return err
		}
		switch st {
		case "paused", "prelaunch":
			return nil
		case "inmigrate":
		default:
			return fmt.Errorf("the helper machine is %s after loading the state", st)
		}
		select {
		case <-m.Exited():
			return m.Wait(ctx)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// describePublished writes the new image's vm.json (the machine without
// host paths, as golden images have it) and lists its files: the kernel
// the machine restores with comes from its own image on the FUSE view.
func describePublished(v *vm, s *snapshot) ([]imageclient.PublishFile, error) {
	tmpl := s.spec
	tmpl.Name, tmpl.Dir, tmpl.Kernel, tmpl.Initrd, tmpl.Incoming, tmpl.MemoryFile = "", "", "", "", nil, nil
	tmpl.Disks = []vmm.Disk{{Format: vmm.QCOW2, Interface: s.spec.Disks[0].Interface}}
	tmpl.Channels = slices.Clone(s.spec.Channels)
	for i := range tmpl.Channels {
		tmpl.Channels[i].Socket = ""
	}
	cfg := VMConfig{Version: 1, Spec: tmpl, Kernel: KernelFile, Root: RootFile, Memory: MemoryFile}
	kernelName := KernelFile
	if v.resumeKernel {
		// As a suspended image: only ever restored, it carries the resume
		// kernel as its kernel.
		cfg.Kernel, cfg.ResumeKernel, kernelName = ResumeKernelFile, ResumeKernelFile, ResumeKernelFile
	}
	state := s.state
	if s.spec.MemoryFile != nil {
		cfg.RAM = RAMFile
	} else {
		state = filepath.Join(s.dir, MemoryFile) // RAM is in the stream
		if err := os.Rename(s.state, state); err != nil {
			return nil, err
		}
	}
	if s.spec.Initrd != "" {
		cfg.Initrd = InitrdFile
	}
	cfgPath := filepath.Join(s.dir, ConfigFile)
	if err := writeJSON(cfgPath, cfg); err != nil {
		return nil, err
	}
	files := []imageclient.PublishFile{
		{Name: ConfigFile, Path: cfgPath, Kind: imagev1.FileKind_FILE_KIND_CONFIG},
		{Name: kernelName, Path: s.spec.Kernel, Kind: imagev1.FileKind_FILE_KIND_KERNEL},
		{Name: RootFile, Path: s.root, Kind: imagev1.FileKind_FILE_KIND_DISK},
		{Name: MemoryFile, Path: state, Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE},
	}
	if cfg.RAM != "" {
		files = append(files, ramPublishFile(s.spec.MemoryFile.Path))
	}
	if cfg.Initrd != "" {
		files = append(files, imageclient.PublishFile{Name: InitrdFile, Path: s.spec.Initrd, Kind: imagev1.FileKind_FILE_KIND_INITRD})
	}
	return files, nil
}

// publishedAttributes are the new image's: its machine, its golden image's
// attributes (not the grid's labels: the new image has an owner of its
// own), and every action the machine has performed.
func publishedAttributes(v *vm, golden *imagev1.Manifest, s *snapshot, labels map[string]string) *imagev1.ImageAttributes {
	ga := golden.GetAttributes()
	attrs := &imagev1.ImageAttributes{
		Arch: ga.GetArch(), Vcpus: uint32(s.spec.VCPUs), MemoryMib: uint64(s.spec.MemoryMiB), Os: ga.GetOs(),
		Parent: golden.GetName(), Boot: ga.GetBoot(), GuestAgent: ga.GetGuestAgent(),
		Actions: slices.Clone(v.performed),
		Labels:  map[string]string{},
	}
	for k, val := range ga.GetLabels() {
		if !strings.HasPrefix(k, imagev1.GridLabelPrefix) && k != suspendedLabel {
			attrs.Labels[k] = val
		}
	}
	maps.Copy(attrs.Labels, labels)
	attrs.Labels[imagev1.VMLabel] = v.ad.VmId
	return attrs
}

// recordPerformed keeps, for a later PublishVM or SuspendVM, every
// configuration action the machine has performed: its image's, then those
// of its plan the image had not, in the order they ran (not the ones that
// failed and were recovered); and whether any was a host action.
func (l *line) recordPerformed() {
	failed := map[string]bool{}
	l.v.mu.Lock()
	for _, r := range l.v.ad.GetActions() {
		if r.Recovered || r.Error != "" {
			failed[r.Id] = true
		}
	}
	l.v.mu.Unlock()
	done := slices.Clone(l.src.manifest.GetAttributes().GetActions())
	host := false
	for _, s := range l.plan.Todo() {
		host = host || dag.IsHost(s.Action)
		if !failed[s.Action.Id] {
			done = append(done, &imagev1.Action{Name: s.Action.Id, Kind: s.Kind, Digest: s.Digest})
		}
	}
	l.v.performed, l.v.hostActions = done, host
}
