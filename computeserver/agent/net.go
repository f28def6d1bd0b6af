package agent

import (
	"context"
	"fmt"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
)

// nicWait bounds the wait for a hot-plugged NIC to appear in the guest
// (PCIe hot-plug, then virtio_net's probe).
const nicWait = 20 * time.Second

// configureNetwork gives the NIC with req.MAC its address, MTU and route
// (netlink, in the guest: the agent needs no ip tool), brings it and
// loopback up and sets the hostname.
func configureNetwork(ctx context.Context, req *Request) error {
	mac, err := net.ParseMAC(req.MAC)
	if err != nil {
		return fmt.Errorf("mac %q: %w", req.MAC, err)
	}
	addr, err := netlink.ParseAddr(req.Address)
	if err != nil {
		return fmt.Errorf("address %q: %w", req.Address, err)
	}
	find := mac
	if req.CurrentMAC != "" {
		if find, err = net.ParseMAC(req.CurrentMAC); err != nil {
			return fmt.Errorf("current_mac %q: %w", req.CurrentMAC, err)
		}
	}
	link, err := waitLink(ctx, find)
	if err != nil {
		return err
	}
	if !strings.EqualFold(link.Attrs().HardwareAddr.String(), mac.String()) {
		// Down first: a running NIC may refuse a new address.
		_ = netlink.LinkSetDown(link)
		if err := netlink.LinkSetHardwareAddr(link, mac); err != nil {
			return fmt.Errorf("mac of %s: %w", link.Attrs().Name, err)
		}
	}
	if lo, err := netlink.LinkByName("lo"); err == nil {
		_ = netlink.LinkSetUp(lo)
	}
	if req.MTU > 0 {
		if err := netlink.LinkSetMTU(link, req.MTU); err != nil {
			return fmt.Errorf("mtu of %s: %w", link.Attrs().Name, err)
		}
	}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("address of %s: %w", link.Attrs().Name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("%s up: %w", link.Attrs().Name, err)
	}
	if req.Gateway != "" {
		gw := net.ParseIP(req.Gateway)
		if gw == nil {
			return fmt.Errorf("gateway %q is not an address", req.Gateway)
		}
		if err := netlink.RouteReplace(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw}); err != nil {
			return fmt.Errorf("default route via %s: %w", gw, err)
		}
	}
	if req.Hostname != "" {
		if err := syscall.Sethostname([]byte(req.Hostname)); err != nil {
			return err
		}
		return writeFile("/etc/hostname", []byte(req.Hostname+"\n"), 0o644)
	}
	return nil
}

// waitLink waits for the link with mac.
func waitLink(ctx context.Context, mac net.HardwareAddr) (netlink.Link, error) {
	deadline := time.Now().Add(nicWait)
	for {
		links, err := netlink.LinkList()
		if err != nil {
			return nil, err
		}
		for _, l := range links {
			if strings.EqualFold(l.Attrs().HardwareAddr.String(), mac.String()) {
				return l, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no NIC with MAC %s appeared within %s (is virtio_net loaded?)", mac, nicWait)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
