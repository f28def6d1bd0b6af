package computev1

import (
	"fmt"
	"net"
	"net/netip"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// MaxVNI is the largest VXLAN network identifier.
const MaxVNI = 1<<24 - 1

// validateNetwork checks a VM's network attachment (nil: no network).
func validateNetwork(n *NetworkAttachment) error {
	if n == nil {
		return nil
	}
	if err := imagev1.ValidateName("network.domain", n.Domain); err != nil {
		return err
	}
	if n.Vni == 0 || n.Vni > MaxVNI {
		return fmt.Errorf("network.vni %d: want 1..%d", n.Vni, MaxVNI)
	}
	if hw, err := net.ParseMAC(n.Mac); err != nil || len(hw) != 6 || hw[0]&1 != 0 {
		return fmt.Errorf("network.mac %q: want a unicast MAC address aa:bb:cc:dd:ee:ff", n.Mac)
	}
	for _, f := range []struct{ name, v string }{{"network.address", n.Address}, {"network.host_address", n.HostAddress}} {
		if p, err := netip.ParsePrefix(f.v); err != nil || !p.Addr().Is4() || p.Bits() < 8 || p.Bits() > 30 {
			return fmt.Errorf("%s %q: want an IPv4 address with a prefix length of 8..30 (10.1.2.3/24)", f.name, f.v)
		}
	}
	if n.Hostname != "" {
		if err := imagev1.ValidateName("network.hostname", n.Hostname); err != nil {
			return err
		}
	}
	return nil
}
