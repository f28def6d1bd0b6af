package agent

import (
	"context"
	"net"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/vmgrid/vmgrid/computeserver/vnet/vnettest"
)

// configure_network finds the NIC by its MAC and gives it address and MTU,
// in a namespace standing in for the guest.
func TestConfigureNetwork(t *testing.T) {
	h := vnettest.NewLAN(t).Host()
	mac, _ := net.ParseMAC("02:00:00:00:09:02")
	vnettest.In(t, h.Netns, func() error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "nic0", HardwareAddr: mac}, PeerName: "nic0p"}); err != nil {
			return err
		}
		resp := Handle(context.Background(), &Request{Op: OpNetwork, MAC: mac.String(), Address: "10.128.9.2/24", MTU: 1450})
		if resp.Error != "" {
			t.Errorf("configure_network: %s", resp.Error)
			return nil
		}
		l, err := netlink.LinkByName("nic0")
		if err != nil {
			return err
		}
		addrs, _ := netlink.AddrList(l, netlink.FAMILY_V4)
		if len(addrs) != 1 || addrs[0].IPNet.String() != "10.128.9.2/24" || l.Attrs().MTU != 1450 || l.Attrs().Flags&net.FlagUp == 0 {
			t.Errorf("nic0: %v, mtu %d, flags %v", addrs, l.Attrs().MTU, l.Attrs().Flags)
		}
		if resp := Handle(context.Background(), &Request{Op: OpNetwork, MAC: "zz", Address: "10.0.0.1/24"}); resp.Error == "" {
			t.Error("a bad MAC was taken")
		}
		return nil
	})
}
