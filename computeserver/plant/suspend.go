package plant

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// suspension is a suspend under way: the machine is saved (its memory
// state in the VM's directory) and gone; its disk is written back, then
// the state is published as the image name. A step that fails (the image
// server away) leaves it here, the VM in state SUSPENDED with an error,
// and a retried SuspendVM goes on from the failed step.
type suspension struct {
	name  string
	files []imageclient.PublishFile
	attrs *imagev1.ImageAttributes
}

// SuspendVM saves a persistent VM: its memory state becomes an image on the
// image server (labelled with the VM's owner, whose data it is), its disk is
// written back, and it leaves this plant.
func (p *Plant) SuspendVM(ctx context.Context, id string, images *imageclient.Client) (*computev1.ClassAd, error) {
	v, err := p.readyVM(ctx, id)
	if err != nil {
		return nil, err
	}
	if v.ad.PersistentDisk == "" {
		return nil, fmt.Errorf("vm %q is a clone whose redo log lives on this plant; only persistent VMs (created with persistent_disk, vmgrid vm create --persistent) can be suspended: %w", id, errdefs.ErrFailedPrecondition)
	}
	if v.ad.Network != nil {
		return nil, fmt.Errorf("vm %q has a network, and suspending a VM with a NIC is not supported yet: %w", id, errdefs.ErrFailedPrecondition)
	}
	v.busy.Lock()
	defer v.busy.Unlock()
	v.mu.Lock()
	s, m := v.suspending, v.m
	v.mu.Unlock()
	if s == nil {
		if m == nil {
			return nil, fmt.Errorf("vm %q is not running: %w", id, errdefs.ErrFailedPrecondition)
		}
		if s, err = p.saveMachine(ctx, v, m); err != nil {
			return nil, err // the machine runs on (vmm.Machine.Suspend)
		}
	}
	if err := p.finishSuspend(ctx, v, s, images); err != nil {
		v.mu.Lock()
		v.ad.Error = fmt.Sprintf("saved on plant %s but not yet written back and published (%v); retry SuspendVM", p.cfg.Name, err)
		v.mu.Unlock()
		return nil, err
	}
	p.mu.Lock()
	delete(p.vms, id)
	p.mu.Unlock()
	os.RemoveAll(v.dir)
	v.mu.Lock()
	v.ad.State, v.ad.SuspendedImage, v.ad.Pid, v.ad.Error = computev1.VMState_VM_STATE_SUSPENDED, s.name, 0, ""
	v.ad.Plant, v.ad.ConsoleLog, v.ad.AgentSocket = "", "", ""
	ad := proto.Clone(v.ad).(*computev1.ClassAd)
	v.mu.Unlock()
	p.log.Info("VM suspended", zap.String("vm", id), zap.String("state_image", s.name))
	return ad, nil
}

// saveMachine describes the state image, saves the machine's memory state
// and ends the machine: from then on a retry goes on from the state. v.busy
// is held, not v.mu (the hydration's progress takes it while it stops).
func (p *Plant) saveMachine(ctx context.Context, v *vm, m vmm.Machine) (*suspension, error) {
	s, err := describeSuspended(v, m.Spec())
	if err != nil {
		return nil, err
	}
	if err := m.Suspend(ctx, filepath.Join(v.dir, MemoryFile)); err != nil {
		return nil, err
	}
	v.access.close()
	v.mem.stop()
	v.mu.Lock()
	defer v.mu.Unlock()
	v.mem = nil
	if v.agent != nil {
		v.agent.Close()
		v.agent = nil
	}
	v.m, v.suspending = nil, s
	v.ad.State = computev1.VMState_VM_STATE_SUSPENDED
	return s, nil
}

// describeSuspended writes the state image's vm.json (the machine without
// host paths) and lists its files and attributes.
func describeSuspended(v *vm, spec vmm.Spec) (*suspension, error) {
	id := v.ad.VmId
	tmpl := spec
	tmpl.Name, tmpl.Dir, tmpl.Kernel, tmpl.Initrd, tmpl.Incoming = "", "", "", "", nil
	tmpl.MemoryFile = memoryTemplate(spec.MemoryFile) // RAM is in the stream (lazymem.go)
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
	labels := map[string]string{suspendedLabel: id}
	if v.ad.Owner != "" {
		labels[imagev1.OwnerLabel] = v.ad.Owner
	}
	// The actions the machine performed stay with it: a resumed VM that is
	// published records them.
	attrs := &imagev1.ImageAttributes{Arch: v.ad.Hardware.GetArch(), Vcpus: uint32(spec.VCPUs), MemoryMib: uint64(spec.MemoryMiB), Parent: v.ad.Image,
		Labels: labels, Actions: slices.Clone(v.performed)}
	files := []imageclient.PublishFile{
		{Name: ConfigFile, Path: cfgPath, Kind: imagev1.FileKind_FILE_KIND_CONFIG},
		{Name: kernelName, Path: spec.Kernel, Kind: imagev1.FileKind_FILE_KIND_KERNEL},
		{Name: MemoryFile, Path: filepath.Join(v.dir, MemoryFile), Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE},
	}
	if spec.Initrd != "" {
		files = append(files, imageclient.PublishFile{Name: InitrdFile, Path: spec.Initrd, Kind: imagev1.FileKind_FILE_KIND_INITRD})
	}
	return &suspension{name: fmt.Sprintf("%s-suspended-%d", id, time.Now().UnixNano()), files: files, attrs: attrs}, nil
}

// finishSuspend writes the disk back and publishes the state image: the
// image appears only once the disk it fits is on the image server. A
// publish whose answer was lost finds its image there on the retry.
func (p *Plant) finishSuspend(ctx context.Context, v *vm, s *suspension, images *imageclient.Client) error {
	if _, err := p.cfg.Proxy.Flush(ctx, v.ad.PersistentDisk); err != nil {
		return fmt.Errorf("write-back of %s: %w", v.ad.PersistentDisk, err)
	}
	_, err := images.Publish(ctx, imageclient.PublishSpec{Name: s.name, Attributes: s.attrs, Files: s.files}, nil)
	if errdefs.IsAlreadyExists(err) {
		m, gerr := images.API.GetImage(ctx, &imagev1.GetImageRequest{Name: s.name})
		if gerr == nil && m.GetManifest().GetAttributes().GetLabels()[suspendedLabel] == v.ad.VmId {
			err = nil
		}
	}
	if err != nil {
		return fmt.Errorf("publish the memory state of %s: %w", v.ad.VmId, err)
	}
	return nil
}
