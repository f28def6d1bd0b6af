// Package vnettest makes separate "hosts" for network tests: named network
// namespaces, each with its own underlay address, joined by a bridge in the
// root namespace (the test's LAN, with no address of the root's on it).
// Everything gets a unique prefix per test run and is removed by
// t.Cleanup, also when the test fails.
package vnettest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math/big"
	"net"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// LAN is a test underlay: a bridge and the hosts on it.
type LAN struct {
	t      testing.TB
	id     string // unique per run: 4 hex digits
	bridge netlink.Link
	net    [3]byte // 10.X.Y.0/24
	hosts  int
}

// Host is a namespace on the LAN.
type Host struct {
	Name  string // of the namespace: /run/netns/NAME
	Netns string // its path
	Addr  string // its underlay address
}

// NeedRoot skips a test that cannot make namespaces.
func NeedRoot(t testing.TB) {
	t.Helper()
	ns, err := netns.Get()
	if err != nil {
		t.Skipf("no network namespaces here: %v", err)
	}
	ns.Close()
	if _, err := netlink.LinkList(); err != nil {
		t.Skipf("no netlink here: %v", err)
	}
}

// NewLAN makes a LAN in a random 10.X.Y.0/24 (X in 200..249): its
// addresses exist only inside the test's namespaces.
func NewLAN(t testing.TB) *LAN {
	t.Helper()
	NeedRoot(t)
	var b [2]byte
	_, _ = rand.Read(b[:])
	x, _ := rand.Int(rand.Reader, big.NewInt(50))
	l := &LAN{t: t, id: hex.EncodeToString(b[:]), net: [3]byte{10, byte(200 + x.Int64()), b[1]}}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "tl" + l.id + "br"}}
	if err := netlink.LinkAdd(br); err != nil {
		t.Fatalf("test LAN bridge: %v", err)
	}
	t.Cleanup(func() { _ = netlink.LinkDel(br) })
	if err := netlink.LinkSetUp(br); err != nil {
		t.Fatal(err)
	}
	l.bridge = br
	return l
}

// Host adds a host: a named namespace with a veth to the LAN and the next
// address.
func (l *LAN) Host() Host {
	t := l.t
	t.Helper()
	l.hosts++
	h := Host{Name: fmt.Sprintf("tl%s-h%d", l.id, l.hosts), Addr: fmt.Sprintf("%d.%d.%d.%d", l.net[0], l.net[1], l.net[2], l.hosts+1)}
	h.Netns = "/run/netns/" + h.Name
	ns := newNamed(t, h.Name)
	defer ns.Close()
	outer, inner := fmt.Sprintf("tl%sv%d", l.id, l.hosts), fmt.Sprintf("tl%si%d", l.id, l.hosts)
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: outer, MasterIndex: l.bridge.Attrs().Index}, PeerName: inner}
	if err := netlink.LinkAdd(v); err != nil {
		t.Fatalf("veth: %v", err)
	}
	t.Cleanup(func() { _ = netlink.LinkDel(v) })
	if err := netlink.LinkSetUp(v); err != nil {
		t.Fatal(err)
	}
	p, err := netlink.LinkByName(inner)
	if err == nil {
		err = netlink.LinkSetNsFd(p, int(ns))
	}
	if err != nil {
		t.Fatalf("veth into %s: %v", h.Name, err)
	}
	In(t, h.Netns, func() error {
		p, err := netlink.LinkByName(inner)
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(p, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(h.Addr), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		lo, _ := netlink.LinkByName("lo")
		_ = netlink.LinkSetUp(lo)
		return netlink.LinkSetUp(p)
	})
	return h
}

// newNamed makes /run/netns/NAME and removes it at cleanup.
func newNamed(t testing.TB, name string) netns.NsHandle {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.NewNamed(name)
	if serr := netns.Set(orig); serr != nil {
		t.Fatalf("back to the test's namespace: %v", serr)
	}
	if err != nil {
		t.Fatalf("namespace %s: %v", name, err)
	}
	t.Cleanup(func() { _ = netns.DeleteNamed(name) })
	return ns
}

// In runs f inside the namespace at path and fails t on error.
func In(t testing.TB, path string, f func() error) {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	runtime.LockOSThread()
	orig, _ := netns.Get()
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	ferr := f()
	if err := netns.Set(orig); err != nil {
		t.Fatalf("back to the test's namespace: %v", err) // thread stays locked
	}
	runtime.UnlockOSThread()
	if ferr != nil {
		t.Fatalf("in %s: %v", path, ferr)
	}
}
