package vnet

import (
	"context"
	"io"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmgrid/vmgrid/computeserver/vnet/vnettest"
)

func plantOn(t *testing.T, h vnettest.Host, name string) *Manager {
	t.Helper()
	m, err := New(Config{Underlay: h.Addr, Netns: h.Netns, Prefix: PrefixFor(name)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	if err := m.Reconcile(nil); err != nil {
		t.Fatal(err)
	}
	return m
}

func cidr(s string) *net.IPNet {
	ip, n, _ := net.ParseCIDR(s)
	n.IP = ip
	return n
}

// listenIn listens on the dialer of vni (standing in for a guest) and
// returns the address and what the first connection sends.
func listenIn(t *testing.T, m *Manager, vni uint32, addr string) (got chan string, accepted *int) {
	t.Helper()
	var ln net.Listener
	dial, err := m.dialer(vni)
	if err != nil {
		t.Fatal(err)
	}
	if err := inNS(dial, func() error {
		var err error
		ln, err = net.Listen("tcp4", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got, n := make(chan string, 4), new(int)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			*n++
			b, _ := io.ReadAll(c)
			c.Close()
			got <- string(b)
		}
	}()
	return got, n
}

// TestSegmentsAcrossHosts: two plants on two hosts (namespaces on a test
// LAN) join one domain's segment over VXLAN; another domain's segment with
// the same addresses never carries its frames.
func TestSegmentsAcrossHosts(t *testing.T) {
	lan := vnettest.NewLAN(t)
	ha, hb := lan.Host(), lan.Host()
	a, b := plantOn(t, ha, "plant-a"), plantOn(t, hb, "plant-b")
	for _, m := range []*Manager{a, b} {
		for _, vni := range []uint32{101, 202} {
			addr := "10.77.0.1/24"
			if m == b {
				addr = "10.77.0.2/24"
			}
			if _, err := m.Attach(vni, cidr(addr), "vm-"+m.cfg.Prefix+string(rune('0'+vni%10))); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := a.SetPeers(101, []string{a.Endpoint(), b.Endpoint()}); err != nil {
		t.Fatal(err)
	}
	if err := b.SetPeers(101, []string{a.Endpoint(), b.Endpoint()}); err != nil {
		t.Fatal(err)
	}
	if got := a.Peers(101); !slices.Equal(got, []string{b.Endpoint()}) {
		t.Fatalf("peers of a: %v, want only b's", got)
	}
	got, _ := listenIn(t, b, 101, "10.77.0.2:7000")
	_, other := listenIn(t, b, 202, "10.77.0.2:7000")
	before, _ := b.Counters(202, "vxlan")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := a.Dial(ctx, 101, "10.77.0.2:7000")
	if err != nil {
		t.Fatalf("dial across the VXLAN: %v", err)
	}
	io.WriteString(c, "hello over vxlan")
	c.Close()
	select {
	case s := <-got:
		if s != "hello over vxlan" {
			t.Fatalf("got %q", s)
		}
	case <-ctx.Done():
		t.Fatal("nothing arrived")
	}
	// VNI 202 has no peers on a: a's frames stay on its own host.
	dctx, dcancel := context.WithTimeout(context.Background(), time.Second)
	defer dcancel()
	if c, err := a.Dial(dctx, 202, "10.77.0.2:7000"); err == nil {
		c.Close()
		t.Fatal("reached another segment")
	}
	after, _ := b.Counters(202, "vxlan")
	if *other != 0 || after.RxPackets != before.RxPackets {
		t.Fatalf("another segment saw frames: %d connections, its VXLAN rx %d -> %d", *other, before.RxPackets, after.RxPackets)
	}
	if vx, _ := b.Counters(101, "vxlan"); vx.RxPackets == 0 {
		t.Fatal("the VXLAN counted nothing received")
	}
}

// TestReconcileAndDetach: a segment goes with its last VM; a restarted
// plant removes what its previous process left.
func TestReconcileAndDetach(t *testing.T) {
	lan := vnettest.NewLAN(t)
	h := lan.Host()
	m := plantOn(t, h, "plant-r")
	for _, id := range []string{"vm-1", "vm-2"} {
		at, err := m.Attach(300, cidr("10.78.0.1/24"), id)
		if err != nil {
			t.Fatal(err)
		}
		defer at.Tap.Close()
	}
	if _, err := m.dialer(300); err != nil {
		t.Fatal(err)
	}
	devs, _ := m.Devices()
	if len(devs) != 5 { // bridge, vxlan, dialer veth, two taps
		t.Fatalf("devices %v", devs)
	}
	if m.Detach(300, "vm-1") {
		t.Fatal("segment removed while vm-2 is on it")
	}
	// A new process of the same plant: nothing of the old one is kept.
	m2, err := New(Config{Underlay: h.Addr, Netns: h.Netns, Prefix: PrefixFor("plant-r")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if err := m2.Reconcile(nil); err != nil {
		t.Fatal(err)
	}
	if devs, _ := m2.Devices(); len(devs) != 0 {
		t.Fatalf("left after reconcile: %v", devs)
	}
	if len(TapName("x")) > 15 {
		t.Fatal("name too long")
	}
}

func TapName(id string) string { c := Config{Prefix: PrefixFor("p")}; return c.TapName(id) }

// TestAttachHeld: a held tap is off the bridge (its VM sees none of the
// segment's frames) until Plug puts it on.
func TestAttachHeld(t *testing.T) {
	lan := vnettest.NewLAN(t)
	m := plantOn(t, lan.Host(), "plant-h")
	at, err := m.AttachHeld(310, cidr("10.79.0.1/24"), "vm-held")
	if err != nil {
		t.Fatal(err)
	}
	defer at.Tap.Close()
	master := func() int {
		var idx int
		if err := m.do(func() error {
			l, err := netlink.LinkByName(at.TapName)
			if err == nil {
				idx = l.Attrs().MasterIndex
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return idx
	}
	if master() != 0 {
		t.Fatal("a held tap is on a bridge")
	}
	mac, _ := net.ParseMAC("52:54:00:12:34:56")
	if err := m.Plug(310, "vm-held", mac); err != nil {
		t.Fatal(err)
	}
	var br int
	_ = m.do(func() error { l, err := netlink.LinkByName(m.cfg.bridgeName(310)); br = l.Attrs().Index; return err })
	if got := master(); got != br || br == 0 {
		t.Fatalf("plugged tap's master %d, bridge %d", got, br)
	}
	// The bridge sends the VM's frames to the tap before the guest sent any.
	var onTap bool
	_ = m.do(func() error {
		l, err := netlink.LinkByName(at.TapName)
		if err != nil {
			return err
		}
		entries, err := netlink.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
		for _, e := range entries {
			onTap = onTap || (e.HardwareAddr.String() == mac.String() && e.MasterIndex == br)
		}
		return err
	})
	if !onTap {
		t.Fatalf("the bridge has no entry for %s on the plugged tap", mac)
	}
	if err := m.Plug(310, "vm-other", mac); err == nil {
		t.Fatal("plugged a VM that has no tap")
	}
}
