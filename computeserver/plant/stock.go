package plant

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/qemuga"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Stock images (issue 11): images made elsewhere and imported (vmgrid
// image import), which boot from firmware with their own boot loader and
// kernel and carry no vmgrid agent. Which path configures their guest is
// the image's GuestAgent attribute: qemu-ga (the runner's requests through
// qgaAgent) or cloud-init (a NoCloud seed, cloudinit.go).

// QGASocket is the name of a VM's qemu-ga socket in its directory.
const QGASocket = "qga.sock"

// DefaultGuestTimeout bounds the wait for a stock guest to be configured
// (a cold firmware boot of a distribution under TCG, cloud-init included)
// when Config.GuestTimeout is 0.
const DefaultGuestTimeout = 10 * time.Minute

// GuestKind is an image's configuration path, UNSPECIFIED read as vmgrid's
// agent (every image made before the attribute existed).
func GuestKind(a *imagev1.ImageAttributes) imagev1.GuestAgent {
	if k := a.GetGuestAgent(); k != imagev1.GuestAgent_GUEST_AGENT_UNSPECIFIED {
		return k
	}
	return imagev1.GuestAgent_GUEST_AGENT_VMGRID
}

// FirmwareConfig is the vm.json of an imported image: no kernel (SeaBIOS
// boots the root disk), the root on virtio (redo log over the golden raw
// disk), the channel of its guest agent, and the hot-plug ports every
// golden machine has.
func FirmwareConfig(vcpus, memoryMiB int, kind imagev1.GuestAgent) VMConfig {
	return VMConfig{
		Version: 1,
		Spec: vmm.Spec{
			VCPUs: vcpus, MemoryMiB: memoryMiB,
			Disks:     []vmm.Disk{{Format: vmm.QCOW2, Interface: vmm.Virtio}},
			Channels:  []vmm.Channel{{Name: agentPort(kind)}},
			ExtraArgs: hotplugPorts,
		},
		Root: RootFile,
	}
}

// agentPort is the virtio-serial port a guest of that kind listens on.
func agentPort(kind imagev1.GuestAgent) string {
	if kind == imagev1.GuestAgent_GUEST_AGENT_VMGRID {
		return AgentChannel
	}
	return qemuga.PortName // cloud-init images: qemu-ga, where they have it
}

func (l *line) guestKind() imagev1.GuestAgent { return GuestKind(l.src.manifest.GetAttributes()) }
func (l *line) vmgridAgent() bool             { return l.guestKind() == imagev1.GuestAgent_GUEST_AGENT_VMGRID }
func (l *line) stockGuest() bool              { return !l.vmgridAgent() }
func (l *line) stockMachineNeeded() bool      { return l.stockGuest() || l.src.config.Kernel == "" }
func (l *line) qemuGA() bool                  { return l.guestKind() == imagev1.GuestAgent_GUEST_AGENT_QEMU_GA }
func (l *line) cloudInit() bool               { return l.guestKind() == imagev1.GuestAgent_GUEST_AGENT_CLOUD_INIT }
func (l *line) hasAgent() bool                { return l.v.agent != nil }

// renewIdentity: a new machine restored from a memory state is made its
// own (identity.go), through whichever agent it has. A stock image booted
// cold needs none: its first boot makes its machine-id, and cloud-init its
// host keys per instance.
func (l *line) renewIdentity() bool {
	return l.newMachine() && l.hasAgent() && (l.vmgridAgent() || l.restored())
}

// actionsLeft: a cloud-init seed carried the actions already.
func (l *line) actionsLeft() bool { return l.seeded == nil }

func (p *Plant) guestTimeout() time.Duration {
	if p.cfg.GuestTimeout > 0 {
		return p.cfg.GuestTimeout
	}
	return DefaultGuestTimeout
}

// stockMachine fits the machine to a stock image: firmware boot when the
// image has no kernel, and the socket of qemu-ga instead of vmgrid's agent.
// A cloud-init image boots cold (its configuration is read at first boot);
// an image with a memory state is configured through qemu-ga (vmgrid
// image build --from records that).
func (l *line) stockMachine(context.Context) (func(), error) {
	if l.cloudInit() && l.restored() {
		return nil, fmt.Errorf("image %q has a memory state but is configured through cloud-init, which a restored guest does not run again: %w", l.src.image, errdefs.ErrFailedPrecondition)
	}
	if l.src.config.Kernel == "" {
		l.spec.Kernel, l.spec.Initrd, l.spec.Append = "", "", ""
	}
	if l.vmgridAgent() {
		return nil, nil
	}
	l.spec.Channels = []vmm.Channel{{Name: qemuga.PortName, Socket: filepath.Join(l.v.dir, QGASocket)}}
	return nil, nil
}

// qemuGAWait waits until the guest's qemu-ga answers (bounded by the
// plant's guest timeout, the console's tail in the error).
func (l *line) qemuGAWait(ctx context.Context) (func(), error) {
	l.progress(computev1.VMState_VM_STATE_CONFIGURING, "waiting for the QEMU guest agent")
	l.v.setState(computev1.VMState_VM_STATE_CONFIGURING)
	timeout := l.p.guestTimeout()
	if l.restored() {
		timeout = l.p.cfg.agentTimeout()
	}
	qa, err := waitQGA(ctx, l.v.m, l.spec.Channels[0].Socket, timeout)
	if err != nil {
		return nil, fmt.Errorf("the QEMU guest agent of %s did not answer within %s: %w", l.v.ad.VmId, timeout, err)
	}
	l.v.agent = qa
	return func() { qa.Close() }, nil
}
