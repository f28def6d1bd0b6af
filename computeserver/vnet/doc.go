// Package vnet makes a plant's virtual networks (VMPlants §3.4 host-only
// networks joined across hosts as with VNET): per client domain a segment,
// that is a Linux bridge and a VXLAN device (one VNI per domain) bound to
// the plant's underlay address, one tap per VM on the bridge, and VXLAN
// flood entries (all-zero FDB entries, with the peer's port) towards the
// other plants that host the domain. VXLAN learning is off: a learned entry
// would keep a peer's address without its port, and plants sharing a host
// use ports of their own; unicast frames are replicated to the domain's
// plants instead. Everything goes through netlink (github.com/vishvananda/netlink);
// nothing parses `ip` output.
//
// # Names
//
// Device names are short and deterministic (IFNAMSIZ is 16): the plant's
// Prefix (5 characters, from its name and data directory, so plants sharing a network
// namespace keep apart and reconcile only their own), a kind letter and
// the VNI (6 hex digits) or a digest of the VM id (8 hex digits):
// PPPPPbVVVVVV bridge, PPPPPxVVVVVV VXLAN, PPPPPdVVVVVV the dialer's veth,
// PPPPPtHHHHHHHH tap.
//
// # Isolation
//
// Domains never share a bridge or a VNI, so their frames never meet. The
// bridge has no host address, so a guest reaches nothing of the plant's.
// The plant reaches guests (Dial) from a per-segment network namespace of
// its own, joined to the bridge by a veth and holding the plant's lease on
// the segment: nothing listens there and it forwards nothing, so the
// guest's way back leads nowhere else. The namespace exists only as a file
// descriptor of the plant's process: it vanishes with the process.
//
// # Taps
//
// Taps are not persistent: the plant opens them in its namespace and hands
// the descriptor to QEMU (QMP getfd, netdev_add fd=…), so a tap lives as
// long as its QEMU, and a killed plant or QEMU leaves none behind.
// Reconcile removes the bridges, VXLANs and veths of segments no VM uses.
package vnet
