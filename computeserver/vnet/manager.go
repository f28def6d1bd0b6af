package vnet

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/vmgrid/vmgrid/services"
)

// vxlanOverhead is what VXLAN adds to a frame over IPv4 (outer IP, UDP,
// VXLAN and inner Ethernet headers).
const vxlanOverhead = 50

// Manager makes and removes one plant's segments.
type Manager struct {
	cfg      Config
	underlay net.IP
	ns       netns.NsHandle // the plant's namespace (not open: the process's)
	log      *zap.Logger
	mtu      int

	mu   sync.Mutex
	segs map[uint32]*segment
}

// segment is a domain's bridge and VXLAN on this plant.
type segment struct {
	vni   uint32
	taps  map[string]string // VM id → tap name
	dial  netns.NsHandle    // the plant's dialer namespace on the segment
	addr  *net.IPNet        // the dialer's address
	peers map[string]bool   // underlay addresses flooded to
}

// Attachment is what a VM's NIC needs from its segment.
type Attachment struct {
	// Tap is the tap's descriptor, for QEMU (the caller closes it once
	// QEMU holds it).
	Tap *os.File
	// TapName is its device name.
	TapName string
	// MTU of the segment: the underlay's less VXLAN's overhead.
	MTU int
}

// New opens a plant's network manager. Call Reconcile before use.
func New(cfg Config, log *zap.Logger) (*Manager, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg, underlay: net.ParseIP(cfg.Underlay).To4(), log: services.LoggerOr(log), segs: map[uint32]*segment{}, ns: netns.None()}
	if cfg.Netns != "" {
		ns, err := netns.GetFromPath(cfg.Netns)
		if err != nil {
			return nil, fmt.Errorf("vnet: network namespace %s: %w", cfg.Netns, err)
		}
		m.ns = ns
	}
	if err := m.do(func() error { return m.readMTU() }); err != nil {
		m.ns.Close()
		return nil, err
	}
	if m.cfg.Port == 0 {
		if err := m.do(m.pickPort); err != nil {
			m.ns.Close()
			return nil, err
		}
	}
	return m, nil
}

// Config is the manager's configuration (its port chosen).
func (m *Manager) Config() Config { return m.cfg }

// Endpoint is this plant's VXLAN endpoint, ADDR:PORT, for its peers.
func (m *Manager) Endpoint() string {
	return net.JoinHostPort(m.underlay.String(), strconv.Itoa(m.cfg.Port))
}

// do runs f in the plant's namespace.
func (m *Manager) do(f func() error) error { return inNS(m.ns, f) }

// readMTU finds the link of the underlay address and derives the segments'
// MTU from it.
func (m *Manager) readMTU() error {
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("vnet: list links: %w", err)
	}
	for _, l := range links {
		addrs, _ := netlink.AddrList(l, netlink.FAMILY_V4)
		for _, a := range addrs {
			if a.IP.Equal(m.underlay) {
				// Guests see Ethernet's usual MTU at most (loopback's 64 KiB
				// would be legal but unlike any real NIC).
				m.mtu = min(l.Attrs().MTU, 1500) - vxlanOverhead
				return nil
			}
		}
	}
	return fmt.Errorf("vnet: no link has the underlay address %s in the plant's network namespace (--underlay-addr)", m.underlay)
}

// pickPort takes a UDP port free on the underlay address for the plant's
// VXLANs (Config.Port 0): plants sharing a host do not clash, and peers
// learn the port from the registry.
func (m *Manager) pickPort() error {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: m.underlay})
	if err != nil {
		return fmt.Errorf("vnet: pick a VXLAN port on %s: %w", m.underlay, err)
	}
	m.cfg.Port = c.LocalAddr().(*net.UDPAddr).Port
	return c.Close()
}

// Reconcile removes this plant's devices that no running VM uses: at
// start, those a previous process left (its VMs were stopped). keep holds
// the VM ids whose taps and segments stay.
func (m *Manager) Reconcile(keep map[string]bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	used := map[string]bool{}
	for _, s := range m.segs {
		for id, tap := range s.taps {
			if keep[id] {
				used[tap] = true
				used[m.cfg.bridgeName(s.vni)], used[m.cfg.vxlanName(s.vni)], used[m.cfg.dialName(s.vni)] = true, true, true
			}
		}
	}
	var removed []string
	err := m.do(func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		var errs []error
		for _, l := range links {
			name := l.Attrs().Name
			if !strings.HasPrefix(name, m.cfg.Prefix) || len(name) < 12 || used[name] {
				continue
			}
			if err := netlink.LinkDel(l); err != nil && !isNotFound(err) {
				errs = append(errs, fmt.Errorf("remove %s: %w", name, err))
				continue
			}
			removed = append(removed, name)
		}
		return errors.Join(errs...)
	})
	if len(removed) > 0 {
		m.log.Info("removed network devices no VM uses", zap.Strings("devices", removed))
	}
	return err
}

// Devices lists this plant's devices, by name (for tests and operators).
func (m *Manager) Devices() ([]string, error) {
	var out []string
	err := m.do(func() error {
		links, err := netlink.LinkList()
		for _, l := range links {
			if strings.HasPrefix(l.Attrs().Name, m.cfg.Prefix) {
				out = append(out, l.Attrs().Name)
			}
		}
		return err
	})
	sort.Strings(out)
	return out, err
}

// Attach makes (or joins) the segment of vni, with the plant's dialer at
// hostAddr on it, and a tap for the VM on its bridge.
func (m *Manager) Attach(vni uint32, hostAddr *net.IPNet, vmID string) (*Attachment, error) {
	return m.attach(vni, hostAddr, vmID, false)
}

// AttachHeld is Attach with the tap kept off the bridge until Plug: the
// segment is there (the plant floods to its peers and they to it), but no
// frame reaches the VM's NIC. A live migration's destination attaches so:
// its guest must not see the segment's traffic while it still runs on
// the source.
func (m *Manager) AttachHeld(vni uint32, hostAddr *net.IPNet, vmID string) (*Attachment, error) {
	return m.attach(vni, hostAddr, vmID, true)
}

// Plug puts a held tap on its segment's bridge, and points the bridge's
// entry for the VM's MAC at it. A VM migrating in has been sending from
// another plant until now: the bridge learned its MAC behind the VXLAN
// port, and would drop the frames for it that come in there (a bridge
// never sends a frame back out of the port it came in by) until the
// guest, running here, sends a frame of its own. With the entry on the
// tap, the frames sent while the guest is paused for the switch wait in
// the tap for it, rather than being lost and retransmitted by their
// senders (TCP's least retransmission timeout is 200 ms). The entry is
// static and sticky: the frames the guest still sends from the other
// plant until the switch do not move it back; it goes with the tap.
func (m *Manager) Plug(vni uint32, vmID string, mac net.HardwareAddr) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.segs[vni]
	if s == nil || s.taps[vmID] == "" {
		return fmt.Errorf("vnet: VM %s has no tap on segment %d", vmID, vni)
	}
	return m.do(func() error {
		t, err := netlink.LinkByName(s.taps[vmID])
		if err != nil {
			return fmt.Errorf("vnet: tap of %s: %w", vmID, err)
		}
		b, err := netlink.LinkByName(m.cfg.bridgeName(vni))
		if err != nil {
			return fmt.Errorf("vnet: bridge %s: %w", m.cfg.bridgeName(vni), err)
		}
		if err := netlink.LinkSetMaster(t, b); err != nil {
			return fmt.Errorf("vnet: plug the tap of %s: %w", vmID, err)
		}
		if mac == nil {
			return nil
		}
		err = netlink.NeighSet(&netlink.Neigh{LinkIndex: t.Attrs().Index, Family: unix.AF_BRIDGE,
			Flags: netlink.NTF_MASTER | netlink.NTF_STICKY, State: netlink.NUD_NOARP, HardwareAddr: mac})
		if err != nil {
			return fmt.Errorf("vnet: point the bridge's entry for %s at the tap of %s: %w", mac, vmID, err)
		}
		return nil
	})
}

func (m *Manager) attach(vni uint32, hostAddr *net.IPNet, vmID string, held bool) (*Attachment, error) {
	if vni == 0 || vni >= 1<<24 {
		return nil, fmt.Errorf("vnet: VNI %d out of range (1..2^24-1)", vni)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.segs[vni]
	if s == nil {
		var err error
		if s, err = m.makeSegment(vni, hostAddr); err != nil {
			return nil, err
		}
		m.segs[vni] = s
	}
	name := m.cfg.TapName(vmID)
	var tap *os.File
	br := m.cfg.bridgeName(vni)
	if held {
		br = ""
	}
	err := m.do(func() error {
		var err error
		tap, err = m.makeTap(name, br)
		return err
	})
	if err != nil {
		if len(s.taps) == 0 {
			m.removeSegment(s)
		}
		return nil, err
	}
	s.taps[vmID] = name
	return &Attachment{Tap: tap, TapName: name, MTU: m.mtu}, nil
}

// makeTap opens a tap (not persistent: it goes with its last descriptor)
// with virtio-net headers, on bridge br (none when br is empty).
func (m *Manager) makeTap(name, br string) (*os.File, error) {
	master := 0
	if br != "" {
		b, err := netlink.LinkByName(br)
		if err != nil {
			return nil, fmt.Errorf("vnet: bridge %s: %w", br, err)
		}
		master = b.Attrs().Index
	}
	t := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: name, MTU: m.mtu, MasterIndex: master},
		Mode:      netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE,
		NonPersist: true, Queues: 1,
	}
	if err := netlink.LinkAdd(t); err != nil {
		return nil, fmt.Errorf("vnet: tap %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(t); err != nil {
		for _, f := range t.Fds {
			f.Close()
		}
		return nil, fmt.Errorf("vnet: tap %s up: %w", name, err)
	}
	return t.Fds[0], nil
}

// Detach removes a VM's tap (if its QEMU still holds it) and the segment
// when no VM of this plant is on it any more. It reports whether the
// segment went.
func (m *Manager) Detach(vni uint32, vmID string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.segs[vni]
	if s == nil {
		return false
	}
	if name, ok := s.taps[vmID]; ok {
		delete(s.taps, vmID)
		_ = m.do(func() error { return delLink(name) })
	}
	if len(s.taps) > 0 {
		return false
	}
	m.removeSegment(s)
	return true
}

// VNIs are the segments this plant has now.
func (m *Manager) VNIs() []uint32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]uint32, 0, len(m.segs))
	for v := range m.segs {
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Close removes every segment.
func (m *Manager) Close() {
	m.mu.Lock()
	for _, s := range m.segs {
		m.removeSegment(s)
	}
	m.mu.Unlock()
	m.ns.Close()
}

func delLink(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return nil // gone already (a tap whose QEMU exited)
	}
	if err := netlink.LinkDel(l); err != nil && !isNotFound(err) {
		return err
	}
	return nil
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, os.ErrNotExist) || strings.Contains(err.Error(), "no such device")
}
