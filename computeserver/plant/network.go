package plant

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/computeserver/vnet"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Networks. A VM whose request carries a NetworkAttachment (a lease the
// shop made: domain, VNI, MAC, address) gets a virtio-net NIC on its
// domain's segment (vnet). The segment and the tap are made before QEMU
// starts ("network"), and the NIC is on QEMU's command line, on the tap's
// descriptor: golden images are built with a NIC that has no backend
// (goldenNICs), and a restore needs exactly the devices the state was
// saved with, so a clone restores that NIC and gets its tap under it. The
// guest still has the golden's MAC: the agent gives it the lease's, its
// address, MTU and hostname ("nic"). A golden image built without a NIC
// (an older one) gets the NIC hot-plugged instead, once its agent answers:
// that works too but costs 0.4–1 s in the guest (PCIe hot-plug and the
// probe under TCG) where the rewire costs milliseconds.

// goldenMAC is the MAC of a golden image's NIC. No lease has it (leases
// carry their domain's VNI, never 0).
const goldenMAC = "02:00:00:00:00:01"

// goldenNICs are the NICs golden images are built with.
var goldenNICs = []vmm.NIC{{ID: "net0", MAC: goldenMAC}}

// nicPort is the hot-plug port (hotplugPorts) a restored clone's NIC
// takes; attach_disk and stage_in start after it.
const nicPort = "hp0"

// networked reports whether the VM has a network.
func (l *line) networked() bool { return l.v.ad.GetNetwork() != nil }

// network makes the VM's segment (bridge, VXLAN, the plant's dialer) if
// this plant has none of the domain yet, and its tap.
func (l *line) network(ctx context.Context) (func(), error) {
	n := l.v.ad.Network
	if l.p.cfg.Network == nil {
		return nil, fmt.Errorf("plant %s has no guest networks (it runs without --underlay-addr in a namespace it may change): %w", l.p.cfg.Name, errdefs.ErrFailedPrecondition)
	}
	if n.Egress {
		return nil, fmt.Errorf("domain %q asks for egress, which this plant does not provide yet (guests reach only their segment): %w", n.Domain, errdefs.ErrFailedPrecondition)
	}
	host, err := ipNet(n.HostAddress)
	if err != nil {
		return nil, fmt.Errorf("network.host_address: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	t0 := time.Now()
	at, err := l.p.cfg.Network.Attach(n.Vni, host, l.v.ad.VmId)
	if err != nil {
		return nil, fmt.Errorf("network of %s: %w: %w", l.v.ad.VmId, err, errdefs.ErrUnavailable)
	}
	l.nic = vmm.NIC{ID: "net0", MAC: n.Mac, Tap: at.Tap}
	l.mtu = at.MTU
	switch {
	case len(l.spec.NICs) > 0:
		// The image's NIC: its MAC stays (a restore brings the golden's
		// anyway), the agent rewires it.
		l.spec.NICs = slices.Clone(l.spec.NICs)
		l.spec.NICs[0].Tap = at.Tap
		l.current = l.spec.NICs[0].MAC
		if l.booted() {
			l.spec.NICs[0].MAC, l.current = n.Mac, ""
		}
	case l.booted():
		l.spec.NICs = []vmm.NIC{l.nic}
	default:
		l.hotplug = true
	}
	l.log.Info("segment and tap ready", zap.Uint32("vni", n.Vni), zap.String("tap", at.TapName), zap.Duration("took", time.Since(t0)))
	return func() {
		l.closeTap()
		l.p.detachNetwork(l.v)
	}, nil
}

// plugNIC hot-plugs a restored clone's NIC, hands the tap over to QEMU, and has
// the agent configure the guest's side.
func (l *line) plugNIC(ctx context.Context) (func(), error) {
	n, t0 := l.v.ad.Network, time.Now()
	if l.hotplug {
		if err := vmm.AddNIC(ctx, l.v.m, l.nic, nicPort); err != nil {
			return nil, fmt.Errorf("hot-plug the NIC of %s: %w: %w", l.v.ad.VmId, err, errdefs.ErrUnavailable)
		}
		l.hotplugged = 1
	}
	plugged := time.Since(t0)
	l.closeTap() // QEMU holds it now
	req := agent.Request{Op: agent.OpNetwork, MAC: n.Mac, CurrentMAC: l.current, Address: n.Address, MTU: l.mtu, Hostname: n.Hostname}
	resp, err := l.v.agent.Do(ctx, req)
	if err == nil && resp.Error != "" {
		err = fmt.Errorf("%s: %w", resp.Error, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		return nil, fmt.Errorf("the guest agent of %s could not configure its network: %w", l.v.ad.VmId, err)
	}
	l.log.Info("guest network configured", zap.String("address", n.Address), zap.Bool("hot-plugged", l.hotplug), zap.Duration("plug", plugged), zap.Duration("took", time.Since(t0)))
	return nil, nil
}

// closeTap closes the plant's copy of the tap (QEMU has its own).
func (l *line) closeTap() {
	if l.nic.Tap != nil {
		l.nic.Tap.Close()
		l.nic.Tap = nil
	}
}

// detachNetwork removes a VM's tap, and its segment when it was the
// plant's last VM of the domain.
func (p *Plant) detachNetwork(v *vm) {
	n := v.ad.GetNetwork()
	if n == nil || p.cfg.Network == nil {
		return
	}
	if p.cfg.Network.Detach(n.Vni, v.ad.VmId) {
		p.log.Info("segment removed: the plant has no VM of the domain left", zap.String("domain", n.Domain), zap.Uint32("vni", n.Vni))
	}
}

// reconcileNetwork removes the devices a previous process of this plant
// left: its VMs were stopped (reap), so none of their taps, bridges or
// VXLANs is in use.
func (p *Plant) reconcileNetwork() error {
	if p.cfg.Network == nil {
		return nil
	}
	keep := map[string]bool{}
	p.mu.Lock()
	for id := range p.vms {
		keep[id] = true
	}
	p.mu.Unlock()
	return p.cfg.Network.Reconcile(keep)
}

// DialGuest opens a TCP connection from the plant to port on the guest's
// address on its segment, from the plant's dialer namespace on that
// segment: the guest gets no way to the plant's own services.
func (p *Plant) DialGuest(ctx context.Context, vmID string, port int) (net.Conn, error) {
	v, err := p.lookup(vmID)
	if err != nil {
		return nil, err
	}
	n := v.ad.GetNetwork()
	if n == nil || p.cfg.Network == nil {
		return nil, fmt.Errorf("vm %q has no network (create it with a network domain): %w", vmID, errdefs.ErrFailedPrecondition)
	}
	if port < 1 || port > 65535 {
		return nil, fmt.Errorf("port %d: want 1..65535: %w", port, errdefs.ErrInvalidArgument)
	}
	select {
	case <-v.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if v.err != nil {
		return nil, fmt.Errorf("vm %q failed: %w", vmID, v.err)
	}
	ip, err := netip.ParsePrefix(n.Address)
	if err != nil {
		return nil, fmt.Errorf("vm %q: address %q: %w", vmID, n.Address, errdefs.ErrFailedPrecondition)
	}
	c, err := p.cfg.Network.Dial(ctx, n.Vni, net.JoinHostPort(ip.Addr().String(), strconv.Itoa(port)))
	if err != nil {
		return nil, fmt.Errorf("connect to %s port %d: %w: %w", vmID, port, err, errdefs.ErrUnavailable)
	}
	return c, nil
}

// Network is the plant's network manager (nil: none).
func (p *Plant) Network() *vnet.Manager { return p.cfg.Network }

func ipNet(s string) (*net.IPNet, error) {
	ip, n, err := net.ParseCIDR(s)
	if err != nil {
		return nil, err
	}
	n.IP = ip
	return n, nil
}

// CloudInitNetworkConfig is the cloud-init network-config (version 2) of a
// lease, for stock images configured through cloud-init's NoCloud seed
// instead of the agent: the NIC matched by its MAC, its address and MTU.
func CloudInitNetworkConfig(n *computev1.NetworkAttachment, mtu int) string {
	if n == nil {
		return ""
	}
	s := "version: 2\nethernets:\n  vmgrid0:\n" +
		"    match:\n      macaddress: \"" + n.Mac + "\"\n" +
		"    set-name: eth0\n" +
		"    addresses: [\"" + n.Address + "\"]\n"
	if mtu > 0 {
		s += "    mtu: " + strconv.Itoa(mtu) + "\n"
	}
	return s
}
