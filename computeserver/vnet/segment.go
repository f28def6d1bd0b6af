package vnet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// makeSegment makes vni's bridge, its VXLAN on the underlay and the
// plant's dialer namespace on it. On failure nothing is left.
func (m *Manager) makeSegment(vni uint32, hostAddr *net.IPNet) (_ *segment, err error) {
	s := &segment{vni: vni, taps: map[string]string{}, peers: map[string]bool{}, addr: hostAddr, dial: netns.None()}
	defer func() {
		if err != nil {
			m.removeSegment(s)
		}
	}()
	err = m.do(func() error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: m.cfg.bridgeName(vni), MTU: m.mtu}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("vnet: bridge %s: %w", br.Name, err)
		}
		vx := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: m.cfg.vxlanName(vni), MTU: m.mtu, MasterIndex: br.Index},
			VxlanId:   int(vni), SrcAddr: m.underlay, Port: m.cfg.Port,
			// No learning: a learned entry keeps the peer's address but not its
			// port (plants may use different ports), so frames go to the
			// flood entries, which carry both (head-end replication).
			Learning: false,
		}
		if err := netlink.LinkAdd(vx); err != nil {
			if errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("vnet: VXLAN %d exists in this network namespace already (another plant on this host serves the domain: give each plant its own namespace, --netns): %w", vni, err)
			}
			return fmt.Errorf("vnet: VXLAN %s: %w", vx.Name, err)
		}
		for _, l := range []netlink.Link{vx, br} {
			if err := netlink.LinkSetUp(l); err != nil {
				return fmt.Errorf("vnet: %s up: %w", l.Attrs().Name, err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	m.log.Info("segment made", zap.Uint32("vni", vni), zap.String("bridge", m.cfg.bridgeName(vni)))
	return s, nil
}

// makeDialer makes the plant's dialer namespace of s: a veth from the
// bridge into a namespace of its own holding s.addr. Made on the first
// Dial, not with the segment: it costs ~25 ms (a new namespace), which a
// CreateVM need not wait for.
func (m *Manager) makeDialer(s *segment) error {
	ns, err := newNS(m.ns)
	if err != nil {
		return fmt.Errorf("vnet: dialer namespace: %w", err)
	}
	s.dial = ns
	host, peer := m.cfg.dialName(s.vni), m.cfg.peerName(s.vni)
	err = m.do(func() error {
		br, err := netlink.LinkByName(m.cfg.bridgeName(s.vni))
		if err != nil {
			return err
		}
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: host, MTU: m.mtu, MasterIndex: br.Attrs().Index}, PeerName: peer}
		if err := netlink.LinkAdd(v); err != nil {
			return fmt.Errorf("veth %s: %w", host, err)
		}
		if err := netlink.LinkSetUp(v); err != nil {
			return err
		}
		p, err := netlink.LinkByName(peer)
		if err != nil {
			return err
		}
		return netlink.LinkSetNsFd(p, int(ns))
	})
	if err != nil {
		return fmt.Errorf("vnet: dialer of VNI %d: %w", s.vni, err)
	}
	return inNS(ns, func() error {
		p, err := netlink.LinkByName(peer)
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(p, &netlink.Addr{IPNet: s.addr}); err != nil {
			return fmt.Errorf("vnet: dialer address %s: %w", s.addr, err)
		}
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err == nil {
			err = netlink.LinkSetUp(p)
		}
		return err
	})
}

// removeSegment removes s's devices; the dialer's namespace (and its end
// of the veth) goes with its last handle.
func (m *Manager) removeSegment(s *segment) {
	_ = m.do(func() error {
		for _, name := range []string{m.cfg.dialName(s.vni), m.cfg.vxlanName(s.vni), m.cfg.bridgeName(s.vni)} {
			if err := delLink(name); err != nil {
				m.log.Warn("remove network device", zap.String("device", name), zap.Error(err))
			}
		}
		return nil
	})
	s.dial.Close()
	delete(m.segs, s.vni)
	m.log.Info("segment removed", zap.Uint32("vni", s.vni))
}

// SetPeers makes vni's VXLAN flood to exactly the given endpoints
// (ADDR:PORT of the other plants that host the domain; this plant's own is
// skipped): one all-zero FDB entry each.
// A VNI this plant has no segment of is ignored.
func (m *Manager) SetPeers(vni uint32, peers []string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.segs[vni]
	if s == nil {
		return nil
	}
	want := map[string]bool{}
	for _, p := range peers {
		if _, _, err := net.SplitHostPort(p); err == nil && p != m.Endpoint() {
			want[p] = true
		}
	}
	var errs []error
	err := m.do(func() error {
		vx, err := netlink.LinkByName(m.cfg.vxlanName(vni))
		if err != nil {
			return err
		}
		for p := range want {
			if !s.peers[p] {
				if err := floodEntry(vx.Attrs().Index, p, false); err != nil {
					errs = append(errs, fmt.Errorf("flood entry to %s: %w", p, err))
					continue
				}
				s.peers[p] = true
			}
		}
		for p := range s.peers {
			if !want[p] {
				if err := floodEntry(vx.Attrs().Index, p, true); err != nil && !errors.Is(err, unix.ENOENT) {
					errs = append(errs, fmt.Errorf("remove flood entry to %s: %w", p, err))
					continue
				}
				delete(s.peers, p)
			}
		}
		return nil
	})
	if err = errors.Join(append(errs, err)...); err != nil {
		return fmt.Errorf("vnet: peers of VNI %d: %w", vni, err)
	}
	return nil
}

// Peers lists the endpoints vni floods to.
func (m *Manager) Peers(vni uint32) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	if s := m.segs[vni]; s != nil {
		for p := range s.peers {
			out = append(out, p)
		}
	}
	sort.Strings(out)
	return out
}

// Dial opens a TCP connection from the plant's dialer on vni's segment to
// addr (HOST:PORT on the segment).
func (m *Manager) Dial(ctx context.Context, vni uint32, addr string) (net.Conn, error) {
	dial, err := m.dialer(vni)
	if err != nil {
		return nil, err
	}
	// The socket is made on a thread in the dialer's namespace, so it
	// belongs there; connecting and I/O then run anywhere.
	var c net.Conn
	err = inNS(dial, func() error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp4", addr)
		return err
	})
	return c, err
}

// dialer is vni's dialer namespace, made on first use.
func (m *Manager) dialer(vni uint32) (netns.NsHandle, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.segs[vni]
	switch {
	case s == nil:
		return -1, fmt.Errorf("vnet: this plant has no segment of VNI %d", vni)
	case s.dial.IsOpen():
		return s.dial, nil
	case s.addr == nil:
		return -1, fmt.Errorf("vnet: the plant has no address on VNI %d to dial from", vni)
	}
	if err := m.makeDialer(s); err != nil {
		s.dial.Close()
		s.dial = netns.None()
		_ = m.do(func() error { return delLink(m.cfg.dialName(vni)) })
		return -1, err
	}
	return s.dial, nil
}

// Counters are a device's packet counters.
type Counters struct{ RxPackets, TxPackets, RxBytes, TxBytes uint64 }

// Counters reads the counters of one of this plant's devices: the bridge
// ("bridge"), the VXLAN ("vxlan") of vni, or a VM's tap (a VM id).
func (m *Manager) Counters(vni uint32, which string) (Counters, error) {
	name := which
	switch which {
	case "bridge":
		name = m.cfg.bridgeName(vni)
	case "vxlan":
		name = m.cfg.vxlanName(vni)
	default:
		if !strings.HasPrefix(which, m.cfg.Prefix) {
			name = m.cfg.TapName(which)
		}
	}
	var c Counters
	err := m.do(func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		if st := l.Attrs().Statistics; st != nil {
			c = Counters{RxPackets: st.RxPackets, TxPackets: st.TxPackets, RxBytes: st.RxBytes, TxBytes: st.TxBytes}
		}
		return nil
	})
	return c, err
}
