package vmm

import (
	"context"
	"fmt"
	"os"
)

// NIC is a virtio-net NIC on a tap the caller opened (a vnet segment's):
// QEMU gets the tap's descriptor, not its name, so the tap may live in
// another network namespace than QEMU and goes away with QEMU.
type NIC struct {
	// ID names the NIC's netdev and device (net0, …).
	ID string `json:"id"`
	// MAC is the guest's MAC address.
	MAC string `json:"mac"`
	// Tap is the open tap (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR); nil: the NIC
	// has no backend (a golden image's NIC, and a clone's without a
	// network: the guest sees a NIC that carries nothing). Not part of a
	// golden image's vm.json: a clone brings its own.
	Tap *os.File `json:"-"`
}

// nicFiles are the taps QEMU inherits, descriptors 3, 4, … (exec.Cmd's
// ExtraFiles), in Spec.NICs order.
func nicFiles(nics []NIC) []*os.File {
	var out []*os.File
	for _, n := range nics {
		if n.Tap != nil {
			out = append(out, n.Tap)
		}
	}
	return out
}

// nicArgs are QEMU's options for Spec.NICs: each a virtio-net-pci device,
// on a tap netdev over its inherited descriptor when it has a tap. The
// device is the same with or without one, so a clone restores the memory
// state of a golden image built with a NIC that had none.
func nicArgs(nics []NIC) []string {
	var a []string
	fd := 3
	for _, n := range nics {
		dev := fmt.Sprintf("virtio-net-pci,id=%s-dev,mac=%s", n.ID, n.MAC)
		if n.Tap != nil {
			a = append(a, "-netdev", fmt.Sprintf("tap,id=%s,fd=%d", n.ID, fd))
			dev += ",netdev=" + n.ID
			fd++
		}
		a = append(a, "-device", dev)
	}
	return a
}

// validateNICs checks Spec.NICs.
func validateNICs(nics []NIC) error {
	for i, n := range nics {
		if n.ID == "" || n.MAC == "" {
			return fmt.Errorf("spec: NIC %d needs an ID and a MAC", i)
		}
	}
	return nil
}

// AddNIC hot-plugs a NIC into a running machine on the PCIe root port bus
// (a restored clone: its memory state was saved without a NIC, so the NIC
// cannot be on its command line). QEMU duplicates the tap's descriptor;
// the caller closes its own.
func AddNIC(ctx context.Context, m Machine, nic NIC, bus string) error {
	qm, ok := m.(*machine)
	if !ok {
		return fmt.Errorf("vmm: %T cannot take a tap descriptor", m)
	}
	conn, err := nic.Tap.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := conn.Control(func(fd uintptr) { ferr = qm.qmp.GetFD(ctx, nic.ID, int(fd)) }); err != nil {
		return err
	}
	if ferr != nil {
		return qm.fail("getfd", ferr)
	}
	if err := m.QMP(ctx, "netdev_add", map[string]any{"type": "tap", "id": nic.ID, "fd": nic.ID}, nil); err != nil {
		return fmt.Errorf("netdev_add: %w", err)
	}
	if err := m.QMP(ctx, "device_add", map[string]any{"driver": "virtio-net-pci", "id": nic.ID + "-dev", "netdev": nic.ID, "mac": nic.MAC, "bus": bus}, nil); err != nil {
		return fmt.Errorf("device_add: %w", err)
	}
	return nil
}
