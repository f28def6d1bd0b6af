package vnet

import (
	"encoding/binary"
	"net"
	"strconv"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// A peer is a plant's VXLAN endpoint, "ADDR:PORT": plants sharing a host
// (and a namespace) each take a port of their own, so their VXLANs of one
// VNI do not clash, and a flood entry names the peer's port.

// floodEntry adds (or removes, del) the all-zero FDB entry of the VXLAN at
// index vx that floods to peer. netlink.Neigh has no NDA_PORT, so the
// request is built here, as netlink's own NeighAppend builds it, plus the
// port.
func floodEntry(vx int, peer string, del bool) error {
	host, port, err := net.SplitHostPort(peer)
	if err != nil {
		return err
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return err
	}
	ip := net.ParseIP(host).To4()
	if ip == nil {
		return &net.AddrError{Err: "not an IPv4 address", Addr: host}
	}
	proto, flags := unix.RTM_NEWNEIGH, unix.NLM_F_CREATE|unix.NLM_F_APPEND|unix.NLM_F_ACK
	if del {
		proto, flags = unix.RTM_DELNEIGH, unix.NLM_F_ACK
	}
	req := nl.NewNetlinkRequest(proto, flags)
	req.AddData(&netlink.Ndmsg{
		Family: unix.AF_BRIDGE, Index: uint32(vx), State: uint16(netlink.NUD_PERMANENT | netlink.NUD_NOARP), Flags: uint8(netlink.NTF_SELF),
	})
	req.AddData(nl.NewRtAttr(netlink.NDA_DST, ip))
	req.AddData(nl.NewRtAttr(netlink.NDA_LLADDR, make([]byte, 6)))
	pb := make([]byte, 2)
	binary.BigEndian.PutUint16(pb, uint16(p))
	req.AddData(nl.NewRtAttr(netlink.NDA_PORT, pb))
	_, err = req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}
