package plant

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

func TestCloudInitNetworkConfig(t *testing.T) {
	got := CloudInitNetworkConfig(&computev1.NetworkAttachment{Mac: "02:00:00:00:01:02", Address: "10.128.1.2/24"}, 1450)
	want := "version: 2\nethernets:\n  vmgrid0:\n    match:\n      macaddress: \"02:00:00:00:01:02\"\n    set-name: eth0\n    addresses: [\"10.128.1.2/24\"]\n    mtu: 1450\n"
	if got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
}

// The qemu-ga path's configure_network script, run for real in a network
// namespace of the test's own: the NIC found by its old MAC gets the new
// MAC, the address, the MTU and the route.
func TestQGANetworkScript(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (a network namespace)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("no iproute2")
	}
	ns := fmt.Sprintf("vgqga%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	in := func(args ...string) (string, error) {
		out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
		return string(out), err
	}
	if out, err := in("ip", "link", "add", "eth9", "address", "52:54:00:00:00:01", "type", "veth", "peer", "name", "eth9p"); err != nil {
		t.Fatalf("veth link: %v %s", err, out)
	}
	// $0 is the script's name; then the arguments qgaAgent.network passes.
	out, err := in("sh", "-c", qgaNetworkScript, "sh", "52:54:00:00:00:01", "52:54:00:aa:bb:cc", "10.128.5.7/24", "1400", "10.128.5.1", "")
	if err != nil {
		t.Fatalf("script: %v %s", err, out)
	}
	got, _ := in("ip", "-o", "addr", "show", "dev", "eth9")
	link, _ := in("ip", "-o", "link", "show", "dev", "eth9")
	route, _ := in("ip", "route", "show", "default")
	if !strings.Contains(got, "10.128.5.7/24") || !strings.Contains(link, "52:54:00:aa:bb:cc") || !strings.Contains(link, "mtu 1400") || !strings.Contains(route, "via 10.128.5.1") {
		t.Fatalf("after the script:\n%s\n%s\n%s", got, link, route)
	}
	if out, err := in("sh", "-c", qgaNetworkScript, "sh", "52:54:00:00:00:99", "52:54:00:aa:bb:cc", "10.128.5.7/24", "", "", ""); err == nil || !strings.Contains(out, "no NIC with MAC") {
		t.Fatalf("an unknown MAC: %v %s", err, out)
	}
}
