package vmm

import (
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
)

// DiskFormat is the image format of a disk file.
type DiskFormat string

const (
	Raw   DiskFormat = "raw"
	QCOW2 DiskFormat = "qcow2"
)

// DiskInterface is how the guest sees a disk.
type DiskInterface string

const (
	// Virtio disks are virtio-blk PCI devices, /dev/vda, /dev/vdb, … in
	// Spec order; the guest needs the virtio_blk module (Debian's cloud
	// kernel has it only as a module: the tiny image's initramfs loads it).
	Virtio DiskInterface = "virtio"
	// NVMe disks are namespaces 1, 2, … of one NVMe controller, so the
	// guest names them /dev/nvme0n1, /dev/nvme0n2, … in Spec order (one
	// controller per disk would race: NVMe probes asynchronously). The
	// driver is built into Debian's cloud kernel, so an NVMe root boots
	// without an initramfs, but QEMU 7.2's NVMe device is not migratable:
	// Suspend fails on a machine with an NVMe disk.
	NVMe DiskInterface = "nvme"
)

// Disk is a disk image attached to the machine.
type Disk struct {
	Path      string
	Format    DiskFormat    // empty means Raw
	ReadOnly  bool          // the guest cannot write; QEMU opens the file read-only
	Interface DiskInterface // empty means Virtio
	// Cache is QEMU's cache mode (writeback, none, unsafe, …); empty means
	// QEMU's default.
	Cache string
}

// Channel is a virtio-serial port backed by a unix socket on the host on
// which QEMU listens (a guest agent's channel). In the guest the port
// appears as /dev/vportNpM with its Name in /sys/class/virtio-ports/*/name
// (there is no udev to make /dev/virtio-ports/NAME); the guest needs the
// virtio_console module.
type Channel struct {
	Name   string // e.g. org.vmgrid.agent.0
	Socket string // host path of the unix socket QEMU creates
}

// MemoryFile backs guest RAM with a file (memory-backend-file) instead of
// anonymous memory.
type MemoryFile struct {
	Path string
	// Share maps the file shared: guest writes reach the file, and a
	// suspended machine's RAM is the file itself (Suspend leaves RAM out of
	// the state stream, migration capability x-ignore-shared). Without
	// Share the mapping is private copy-on-write: the file is read on
	// demand and never written, which is how a clone restores a memory
	// image lazily.
	Share bool
	// Memfd backs RAM with anonymous shared memory (memory-backend-memfd)
	// instead of a file; Path and Share are unused and RAM is in every
	// state stream. A live migration's destination gets it: the stream
	// brings every page, and post-copy needs memory userfaultfd handles
	// (it does not handle private file mappings).
	Memfd bool `json:",omitempty"`
}

// Incoming makes the machine start by loading a memory state that Suspend
// wrote, instead of booting. Start returns while the state is loading;
// Machine.Resume waits for it and starts the vCPUs.
type Incoming struct {
	// Path of the memory-state file.
	Path string
	// IgnoreShared says the state was saved from a machine with a shared
	// MemoryFile: RAM is not in the stream but comes from Spec.MemoryFile
	// (QEMU's x-ignore-shared capability, needed on both sides).
	IgnoreShared bool
	// Live says the state comes from a live migration the caller drives
	// (migrate.go: ListenIncoming), not from a file: Path is unused.
	Live bool `json:",omitempty"`
}

// Spec describes one QEMU process. Resume a suspended machine with the same
// Spec (devices, memory size, machine type) plus Incoming.
type Spec struct {
	// Name labels the machine in logs and in QEMU's -name.
	Name string
	// Dir is the machine's working directory (created if missing): the
	// monitor socket (qmp.sock), the serial console log (console.log) and
	// QEMU's own output (qemu.log) live there. Unix socket paths are
	// limited to 107 bytes, so keep it short.
	Dir string
	// VCPUs and MemoryMiB; 0 means 1 vCPU and 256 MiB.
	VCPUs     int
	MemoryMiB int
	// Machine is QEMU's machine type; empty means q35.
	Machine string
	// CPU is QEMU's -cpu model; empty means QEMU's default for the
	// accelerator.
	CPU string
	// Accel is "tcg" or "kvm"; empty means the driver's default.
	Accel string
	// Kernel, Initrd and Append boot a kernel directly (no firmware boot
	// loader). Without a Kernel the machine boots from firmware.
	Kernel string
	Initrd string
	Append string
	Disks  []Disk
	// Channels are virtio-serial ports (one virtio-serial-pci controller).
	Channels   []Channel
	MemoryFile *MemoryFile
	Incoming   *Incoming
	// ExtraArgs are appended to QEMU's command line as they are.
	ExtraArgs []string

	// Clone identity (vmgenid.go).
	// VMGenID, when set, adds QEMU's vmgenid device with this GUID: the
	// guest's VM generation ID. A machine restored from a memory state with
	// another GUID than it was saved with sees it change (QEMU writes the
	// new one into guest memory and notifies the guest), which is how a
	// clone learns it is not the machine that was saved.
	VMGenID string `json:",omitempty"`
	// Networks (nic.go): virtio-net NICs on taps the caller opened.
	NICs []NIC `json:",omitempty"`
}

const maxSocketPath = 107 // sizeof(sun_path) - 1

func (s *Spec) setDefaults() {
	if s.VCPUs == 0 {
		s.VCPUs = 1
	}
	if s.MemoryMiB == 0 {
		s.MemoryMiB = 256
	}
	if s.Machine == "" {
		s.Machine = "q35"
	}
	for i := range s.Disks {
		if s.Disks[i].Format == "" {
			s.Disks[i].Format = Raw
		}
		if s.Disks[i].Interface == "" {
			s.Disks[i].Interface = Virtio
		}
	}
}

// Validate reports what is wrong with the spec, before QEMU is started.
func (s *Spec) Validate() error {
	var errs []error
	if s.Dir == "" {
		errs = append(errs, errors.New("spec: Dir is required"))
	} else if p := filepath.Join(s.Dir, consoleSocketName); len(p) > maxSocketPath { // the longest socket name
		errs = append(errs, fmt.Errorf("spec: Dir %q is too long for a unix socket path (%d > %d bytes)", s.Dir, len(p), maxSocketPath))
	}
	if s.VCPUs < 0 || s.MemoryMiB < 0 {
		errs = append(errs, fmt.Errorf("spec: negative VCPUs (%d) or MemoryMiB (%d)", s.VCPUs, s.MemoryMiB))
	}
	if s.Accel != "" && s.Accel != "tcg" && s.Accel != "kvm" {
		errs = append(errs, fmt.Errorf("spec: Accel %q: want tcg or kvm", s.Accel))
	}
	if (s.Append != "" || s.Initrd != "") && s.Kernel == "" {
		errs = append(errs, errors.New("spec: Append or Initrd without Kernel"))
	}
	for i, d := range s.Disks {
		if d.Path == "" {
			errs = append(errs, fmt.Errorf("spec: disk %d has no Path", i))
		}
		if d.Format != "" && d.Format != Raw && d.Format != QCOW2 {
			errs = append(errs, fmt.Errorf("spec: disk %d: Format %q: want raw or qcow2", i, d.Format))
		}
		if d.Interface != "" && d.Interface != NVMe && d.Interface != Virtio {
			errs = append(errs, fmt.Errorf("spec: disk %d: Interface %q: want nvme or virtio", i, d.Interface))
		}
	}
	names := map[string]bool{}
	for i, c := range s.Channels {
		if c.Name == "" || c.Socket == "" {
			errs = append(errs, fmt.Errorf("spec: channel %d needs a Name and a Socket", i))
		}
		if names[c.Name] {
			errs = append(errs, fmt.Errorf("spec: channel name %q used twice", c.Name))
		}
		names[c.Name] = true
		if len(c.Socket) > maxSocketPath {
			errs = append(errs, fmt.Errorf("spec: channel %q: socket path longer than %d bytes", c.Name, maxSocketPath))
		}
	}
	errs = append(errs, s.validateIdentity()...)
	if s.MemoryFile != nil && s.MemoryFile.Path == "" && !s.MemoryFile.Memfd {
		errs = append(errs, errors.New("spec: MemoryFile without Path"))
	}
	if s.Incoming != nil {
		if s.Incoming.Path == "" && !s.Incoming.Live {
			errs = append(errs, errors.New("spec: Incoming without Path"))
		}
		if s.Incoming.IgnoreShared && s.MemoryFile == nil {
			errs = append(errs, errors.New("spec: Incoming.IgnoreShared needs a MemoryFile to take RAM from"))
		}
	}
	errs = append(errs, validateNICs(s.NICs))
	return errors.Join(errs...)
}

// File names inside Spec.Dir.
const (
	qmpSocketName  = "qmp.sock"
	consoleLogName = "console.log"
	// consoleSocketName is the serial console's socket (console.go).
	consoleSocketName = "console.sock"
	qemuLogName       = "qemu.log"
)

// args is QEMU's command line for s (defaults applied, paths absolute).
func (s *Spec) args(accel string) []string {
	a := []string{
		"-name", "guest=" + qemuEscape(orName(s.Name)) + ",debug-threads=on",
		"-nodefaults", "-no-user-config", "-nographic", "-display", "none",
		// A guest reboot ends the process: a kernel panic (panic=-1) or
		// `reboot` is then seen by Wait instead of looping.
		"-no-reboot",
		"-accel", accel,
		"-smp", strconv.Itoa(s.VCPUs),
		"-m", strconv.Itoa(s.MemoryMiB) + "M",
		"-qmp", "unix:" + qemuEscape(filepath.Join(s.Dir, qmpSocketName)) + ",server=on,wait=off",
		// The serial console is a socket one client at a time attaches to
		// (console.go); QEMU logs everything the guest writes to
		// console.log, attached or not.
		"-chardev", "socket,id=console0,server=on,wait=off,path=" + qemuEscape(filepath.Join(s.Dir, consoleSocketName)) +
			",logfile=" + qemuEscape(filepath.Join(s.Dir, consoleLogName)),
		"-serial", "chardev:console0",
	}
	machine := s.Machine
	switch {
	case s.MemoryFile != nil && s.MemoryFile.Memfd:
		a = append(a, "-object", fmt.Sprintf("memory-backend-memfd,id=ram0,size=%dM", s.MemoryMiB))
		machine += ",memory-backend=ram0"
	case s.MemoryFile != nil:
		a = append(a, "-object", fmt.Sprintf("memory-backend-file,id=ram0,size=%dM,mem-path=%s,share=%s",
			s.MemoryMiB, qemuEscape(s.MemoryFile.Path), onOff(s.MemoryFile.Share)))
		machine += ",memory-backend=ram0"
	}
	a = append(a, "-machine", machine)
	if s.CPU != "" {
		a = append(a, "-cpu", s.CPU)
	}
	if s.Kernel != "" {
		a = append(a, "-kernel", s.Kernel)
		if s.Initrd != "" {
			a = append(a, "-initrd", s.Initrd)
		}
		if s.Append != "" {
			a = append(a, "-append", s.Append)
		}
	}
	nvme := 0
	for i, d := range s.Disks {
		id := fmt.Sprintf("disk%d", i)
		drive := fmt.Sprintf("if=none,id=%s,file=%s,format=%s", id, qemuEscape(d.Path), d.Format)
		if d.ReadOnly {
			drive += ",readonly=on"
		}
		if d.Cache != "" {
			drive += ",cache=" + d.Cache
		}
		a = append(a, "-drive", drive)
		switch d.Interface {
		case NVMe:
			if nvme == 0 {
				a = append(a, "-device", "nvme,id=nvme0,serial=vmgrid0")
			}
			nvme++
			a = append(a, "-device", fmt.Sprintf("nvme-ns,drive=%s,bus=nvme0,nsid=%d", id, nvme))
		case Virtio:
			a = append(a, "-device", fmt.Sprintf("virtio-blk-pci,drive=%s,id=vblk%d", id, i))
		}
	}
	if len(s.Channels) > 0 {
		a = append(a, "-device", "virtio-serial-pci,id=vserial0")
		for i, c := range s.Channels {
			a = append(a,
				"-chardev", fmt.Sprintf("socket,id=channel%d,path=%s,server=on,wait=off", i, qemuEscape(c.Socket)),
				"-device", fmt.Sprintf("virtserialport,bus=vserial0.0,chardev=channel%d,name=%s", i, qemuEscape(c.Name)))
		}
	}
	if s.Incoming != nil {
		// Always deferred: capabilities must be set before the stream is
		// opened, and the state file is handed over as a descriptor.
		a = append(a, "-S", "-incoming", "defer")
	}
	a = append(a, s.identityArgs()...)
	a = append(a, nicArgs(s.NICs)...)
	return append(a, s.ExtraArgs...)
}

// qemuEscape doubles commas, QEMU's option separator, in a value.
func qemuEscape(v string) string { return strings.ReplaceAll(v, ",", ",,") }

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func orName(n string) string {
	if n == "" {
		return "vmgrid"
	}
	return n
}
