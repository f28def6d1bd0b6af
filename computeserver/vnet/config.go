package vnet

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"

	"github.com/spf13/pflag"
)

// DefaultPort is the VXLAN UDP port IANA assigned (firewalled grids may
// want to set it: --vxlan-port).
const DefaultPort = 4789

// Config configures a plant's networks.
type Config struct {
	// Underlay is the plant's own address that VXLAN packets leave from
	// and arrive at; other plants send to it. Empty: the compute server
	// takes the host of its listen address.
	Underlay string
	// Port is the VXLAN UDP port; 0 picks a free one at start. Peers
	// learn it from the registry, so plants may differ (plants sharing a
	// host must: VXLANs of one VNI and port clash).
	Port int
	// Netns is the path of the network namespace (/run/netns/NAME,
	// /proc/PID/ns/net) that holds the plant's devices and underlay
	// address; empty: the process's own.
	Netns string
	// Prefix starts every device name of this plant (5 characters;
	// empty: PrefixFor of the plant's name).
	Prefix string
}

// DefaultConfig is a plant's network configuration before its flags: the
// VXLAN port picked at start.
func DefaultConfig() Config { return Config{} }

// AddFlags registers the network flags.
func (c *Config) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.Underlay, "underlay-addr", c.Underlay, "this plant's address for the VXLAN underlay of guest networks (other plants send to it; default: the host of --listen)")
	fs.IntVar(&c.Port, "vxlan-port", c.Port, "UDP port of this plant's VXLAN underlay (0: a free one; peers learn it from etcd)")
	fs.StringVar(&c.Netns, "netns", c.Netns, "network namespace (path) for the plant's bridges, VXLANs and taps (default: the process's)")
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if net.ParseIP(c.Underlay) == nil || net.ParseIP(c.Underlay).To4() == nil {
		return fmt.Errorf("vnet: underlay address %q is not an IPv4 address (--underlay-addr)", c.Underlay)
	}
	if c.Port < 0 || c.Port > 65535 {
		return fmt.Errorf("vnet: VXLAN port %d out of range", c.Port)
	}
	if len(c.Prefix) != 5 {
		return fmt.Errorf("vnet: device prefix %q must be 5 characters", c.Prefix)
	}
	return nil
}

// PrefixFor is the device prefix of a plant: "v" and 4 hex digits of its
// name's digest.
func PrefixFor(plant string) string {
	s := sha256.Sum256([]byte(plant))
	return "v" + hex.EncodeToString(s[:2])
}

// Names of a plant's devices (see the package doc).
func (c *Config) bridgeName(vni uint32) string { return fmt.Sprintf("%sb%06x", c.Prefix, vni) }
func (c *Config) vxlanName(vni uint32) string  { return fmt.Sprintf("%sx%06x", c.Prefix, vni) }
func (c *Config) dialName(vni uint32) string   { return fmt.Sprintf("%sd%06x", c.Prefix, vni) }
func (c *Config) peerName(vni uint32) string   { return fmt.Sprintf("%sp%06x", c.Prefix, vni) }

// TapName is the tap of a VM of this plant.
func (c *Config) TapName(vmID string) string {
	s := sha256.Sum256([]byte(vmID))
	return c.Prefix + "t" + hex.EncodeToString(s[:4])
}
