package vmm

import (
	"context"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/vnet"
	"github.com/vmgrid/vmgrid/computeserver/vnet/vnettest"
)

// A NIC on the command line: QEMU takes the tap's descriptor (the tap lives
// in another namespace than QEMU), the device has the MAC, and the tap
// goes with QEMU.
func TestNICOnTheCommandLine(t *testing.T) {
	d := driver(t)
	img := tinyImage(t)
	nm, at := tapOn(t, 7)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	spec := tinySpec(t, img, overlay(t, img.RootDisk))
	spec.NICs = []NIC{{ID: "net0", MAC: "02:00:00:00:07:02", Tap: at.Tap}}
	m, err := d.Start(ctx, spec)
	at.Tap.Close() // QEMU has its own
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	var filters []struct {
		Name    string `json:"name"`
		MainMac string `json:"main-mac"`
	}
	if err := m.QMP(ctx, "query-rx-filter", nil, &filters); err != nil {
		t.Fatal(err)
	}
	if len(filters) != 1 || filters[0].MainMac != "02:00:00:00:07:02" {
		t.Fatalf("NICs %+v", filters)
	}
	if devs, _ := nm.Devices(); !slices.Contains(devs, at.TapName) {
		t.Fatalf("the tap is gone while QEMU runs: %v", devs)
	}
	if err := m.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if devs, _ := nm.Devices(); slices.Contains(devs, at.TapName) {
		t.Fatalf("the tap outlived QEMU: %v", devs)
	}
}

// tapOn makes a segment of vni on a test host and a tap on it.
func tapOn(t *testing.T, vni uint32) (*vnet.Manager, *vnet.Attachment) {
	t.Helper()
	h := vnettest.NewLAN(t).Host()
	nm, err := vnet.New(vnet.Config{Underlay: h.Addr, Netns: h.Netns, Prefix: vnet.PrefixFor(t.Name())}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nm.Close)
	at, err := nm.Attach(vni, &net.IPNet{IP: net.ParseIP("10.66.0.1"), Mask: net.CIDRMask(24, 32)}, "vm-nic")
	if err != nil {
		t.Fatal(err)
	}
	return nm, at
}

func TestNICArgs(t *testing.T) {
	s := Spec{Dir: "/tmp/x", NICs: []NIC{{ID: "net0"}}}
	if err := s.Validate(); err == nil {
		t.Fatal("a NIC without a MAC must be refused")
	}
	nics := []NIC{{ID: "net0", MAC: "02:00:00:00:00:01"}, {ID: "net1", MAC: "02:00:00:00:00:02", Tap: os.Stdin}}
	a := strings.Join(nicArgs(nics), " ")
	if a != "-device virtio-net-pci,id=net0-dev,mac=02:00:00:00:00:01 -netdev tap,id=net1,fd=3 -device virtio-net-pci,id=net1-dev,mac=02:00:00:00:00:02,netdev=net1" {
		t.Fatalf("args %q", a)
	}
	if f := nicFiles(nics); len(f) != 1 || f[0] != os.Stdin {
		t.Fatalf("files %v", f)
	}
}

// AddNIC hot-plugs a NIC on a tap into a running machine's PCIe root port
// (the path of clones of images built without a NIC).
func TestAddNIC(t *testing.T) {
	d := driver(t)
	img := tinyImage(t)
	_, at := tapOn(t, 8)
	defer at.Tap.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	spec := tinySpec(t, img, overlay(t, img.RootDisk))
	spec.ExtraArgs = []string{"-device", "pcie-root-port,id=hp0,chassis=1,slot=1"}
	m, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	if err := AddNIC(ctx, m, NIC{ID: "net0", MAC: "02:00:00:00:08:02", Tap: at.Tap}, "hp0"); err != nil {
		t.Fatal(err)
	}
	var filters []struct {
		MainMac string `json:"main-mac"`
	}
	if err := m.QMP(ctx, "query-rx-filter", nil, &filters); err != nil {
		t.Fatal(err)
	}
	if len(filters) != 1 || filters[0].MainMac != "02:00:00:00:08:02" {
		t.Fatalf("NICs %+v", filters)
	}
}
