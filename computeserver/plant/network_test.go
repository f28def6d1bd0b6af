package plant

import (
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
