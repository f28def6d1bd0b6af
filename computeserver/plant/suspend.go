package plant

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// SuspendVM saves a persistent VM: its memory state becomes an image on the
// image server, its disk is written back, and it leaves this plant.
func (p *Plant) SuspendVM(ctx context.Context, id string, images *imageclient.Client) (*computev1.ClassAd, error) {
	v, err := p.lookup(id)
	if err != nil {
		return nil, err
	}
	<-v.ready
	if v.ad.PersistentDisk == "" {
		return nil, fmt.Errorf("vm %q is a clone whose redo log lives on this plant; only persistent VMs (created with persistent_disk) can be suspended: %w", id, errdefs.ErrFailedPrecondition)
	}
	if v.ad.Network != nil {
		return nil, fmt.Errorf("vm %q has a network, and suspending a VM with a NIC is not supported yet: %w", id, errdefs.ErrFailedPrecondition)
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
	name := fmt.Sprintf("%s-suspended-%d", id, time.Now().Unix())
	attrs := &imagev1.ImageAttributes{Arch: v.ad.Hardware.GetArch(), Vcpus: uint32(spec.VCPUs), MemoryMib: uint64(spec.MemoryMiB), Parent: v.ad.Image,
		Labels: map[string]string{suspendedLabel: id}}
	files := []imageclient.PublishFile{
		{Name: ConfigFile, Path: cfgPath, Kind: imagev1.FileKind_FILE_KIND_CONFIG},
		{Name: kernelName, Path: spec.Kernel, Kind: imagev1.FileKind_FILE_KIND_KERNEL},
		{Name: MemoryFile, Path: mem, Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE},
	}
	if spec.Initrd != "" {
		files = append(files, imageclient.PublishFile{Name: InitrdFile, Path: spec.Initrd, Kind: imagev1.FileKind_FILE_KIND_INITRD})
	}
	if _, err := images.Publish(ctx, imageclient.PublishSpec{Name: name, Attributes: attrs, Files: files}, nil); err != nil {
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
