package plant

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/services/fsutil"
)

// ConfigFile is the name of a golden image's VM configuration file.
const ConfigFile = "vm.json"

// Names of the other files of a golden image built here.
const (
	KernelFile = "vmlinuz"
	InitrdFile = "initrd.img"
	RootFile   = "root.raw"
	MemoryFile = "mem.state"
	// ResumeKernelFile is the kernel's header alone (see ResumeKernel).
	ResumeKernelFile = "vmlinuz.resume"
)

// AgentChannel is the virtio-serial port of the guest agent.
const AgentChannel = "org.vmgrid.agent.0"

// VMConfig is a golden image's VM configuration (vm.json): the machine it
// was suspended on, without host paths. A clone rebinds the paths (kernel
// and disk on the FUSE view, redo log and sockets in its own directory) and
// must keep everything else equal to restore the memory state.
type VMConfig struct {
	Version int `json:"version"`
	// Spec is the machine: memory, vCPUs, machine type, kernel command
	// line, disk formats and interfaces, channels, extra devices. Paths
	// are empty.
	Spec vmm.Spec `json:"spec"`
	// Files of the image that the machine uses. An empty Kernel boots
	// from firmware (SeaBIOS and the root disk's own boot loader).
	Kernel string `json:"kernel"`
	Initrd string `json:"initrd,omitempty"`
	Root   string `json:"root"`
	Memory string `json:"memory,omitempty"` // empty: cold boot
	// ResumeKernel, when set, is what a restore of Memory passes to QEMU
	// instead of Kernel and Initrd: the kernel's setup header and a page,
	// a few KiB. QEMU needs a kernel to lay the machine out as it was (the
	// same option ROM and firmware config), but the guest's kernel and its
	// initramfs are already in the memory state, and a guest that reboots
	// ends (-no-reboot), so the 14 MB kernel and the initramfs need not
	// cross the network for a clone.
	ResumeKernel string `json:"resume_kernel,omitempty"`
	// RAM, when set, is the guest's RAM as a file (lazymem.go): Memory
	// then holds the device state alone (saved with x-ignore-shared), and
	// a clone maps RAM privately, lazily or after copying it.
	RAM string `json:"ram,omitempty"`
}

// WriteResumeKernel writes the header of the x86 bzImage kernel to out:
// its setup sectors and one page (see VMConfig.ResumeKernel).
func WriteResumeKernel(kernel, out string) error {
	f, err := os.Open(kernel)
	if err != nil {
		return err
	}
	defer f.Close()
	hdr := make([]byte, 0x210)
	if _, err := io.ReadFull(f, hdr); err != nil || string(hdr[0x202:0x206]) != "HdrS" {
		return fmt.Errorf("%s is not an x86 bzImage kernel (no HdrS header)", kernel)
	}
	setup := int64(hdr[0x1f1])
	if setup == 0 {
		setup = 4 // the boot protocol's default
	}
	b := make([]byte, (setup+1)*512+4096)
	n, err := f.ReadAt(b, 0)
	if n < len(b) && err != io.EOF {
		return err
	}
	return fsutil.WriteFileAtomic(out, b[:n])
}

func decodeConfig(b []byte) (*VMConfig, error) {
	var c VMConfig
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("vm.json: %w", err)
	}
	// No kernel: the machine boots from firmware (imported images).
	if c.Version != 1 || c.Root == "" || len(c.Spec.Disks) == 0 {
		return nil, fmt.Errorf("vm.json: version %d, root %q, %d disks: not a configuration this plant can run", c.Version, c.Root, len(c.Spec.Disks))
	}
	return &c, nil
}

// hotplugPorts are PCIe root ports every golden machine has, so a clone can
// receive hot-plugged disks (host actions) after its memory state was
// restored: q35's root bus takes no hotplug.
var hotplugPorts = []string{
	"-device", "pcie-root-port,id=hp0,chassis=1,slot=1",
	"-device", "pcie-root-port,id=hp1,chassis=2,slot=2",
	"-device", "pcie-root-port,id=hp2,chassis=3,slot=3",
	"-device", "pcie-root-port,id=hp3,chassis=4,slot=4",
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}
