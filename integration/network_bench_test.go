package integration

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"testing"
	"time"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// TestNetworkBench measures guest networking on two plants (separate
// hosts, as in TestNetworks): VM-to-VM TCP throughput and round trips on
// one plant and across two (VXLAN), next to the guest's own loopback, and
// what a network adds to CreateVM. Not part of `go test ./...`'s work: it
// runs only with VMGRID_BENCH_NET=1.
//
//	VMGRID_BENCH_NET=1 go test -count=1 -run TestNetworkBench -v ./integration/
func TestNetworkBench(t *testing.T) {
	if os.Getenv("VMGRID_BENCH_NET") == "" {
		t.Skip("a benchmark: VMGRID_BENCH_NET=1 runs it")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	g := startNetGrid(t, ctx, "pa", "pb")
	eventually(t, "both plants registered", func() bool { return g.registered(ctx) == 2 })

	const n = 4
	var plain, lab []*computev1.ClassAd
	for i := range n {
		for _, domain := range []string{"", "lab"} {
			ad, err := g.create(ctx, "alice", fmt.Sprint("b", domain, i), domain)
			if err != nil {
				t.Fatal(err)
			}
			if domain == "" {
				plain = append(plain, ad)
			} else {
				lab = append(lab, ad)
			}
		}
	}
	t.Logf("CreateVM ready (mean of %d, TCG): without a network %v, with one %v", n, meanReady(plain), meanReady(lab))
	for _, ad := range plain {
		g.clients["alice"].DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: ad.VmId})
	}
	same, across := pairs(lab)
	if same == nil || across == nil {
		t.Fatalf("placement gave no pair on one plant or none across: %v", plants(lab))
	}
	for _, c := range []struct {
		name string
		from *computev1.ClassAd
		to   string
		vm   *computev1.ClassAd
	}{
		{"guest loopback", same[0], "127.0.0.1", same[0]},
		{"one plant (bridge)", same[0], ipOf(same[1]), same[1]},
		{"two plants (VXLAN)", across[0], ipOf(across[1]), across[1]},
	} {
		mbs := g.throughput(ctx, c.from, c.vm, c.to)
		rtt := g.rtt(ctx, c.from, c.to)
		t.Logf("%-20s TCP %6.1f MB/s (32 MiB, busybox nc)  ping rtt avg %s ms", c.name, mbs, rtt)
	}
}

func meanReady(ads []*computev1.ClassAd) time.Duration {
	var sum int64
	for _, ad := range ads {
		sum += ad.ReadyNanos
	}
	return time.Duration(sum / int64(len(ads))).Round(time.Millisecond)
}

func plants(ads []*computev1.ClassAd) []string {
	var out []string
	for _, ad := range ads {
		out = append(out, ad.VmId+"@"+ad.Plant)
	}
	return out
}

// pairs finds two VMs on one plant and two on different plants.
func pairs(ads []*computev1.ClassAd) (same, across []*computev1.ClassAd) {
	for i, a := range ads {
		for _, b := range ads[i+1:] {
			if a.Plant == b.Plant && same == nil {
				same = []*computev1.ClassAd{a, b}
			}
			if a.Plant != b.Plant && across == nil {
				across = []*computev1.ClassAd{a, b}
			}
		}
	}
	return same, across
}

var realRE = regexp.MustCompile(`real\s+(\d+)m\s*([\d.]+)s`)

// throughput sends 32 MiB from one guest to a listener in another (or the
// same) and returns MB/s as the sender's time shows it.
func (g *netGrid) throughput(ctx context.Context, from, to *computev1.ClassAd, addr string) float64 {
	g.t.Helper()
	g.sh(ctx, to, "nc -l -p 6000 >/dev/null 2>&1 </dev/null &")
	time.Sleep(300 * time.Millisecond)
	out, _ := g.sh(ctx, from, "time sh -c 'dd if=/dev/zero bs=64k count=512 2>/dev/null | nc "+addr+" 6000'")
	m := realRE.FindStringSubmatch(out)
	if m == nil {
		g.t.Fatalf("no time in %q", out)
	}
	min, _ := strconv.ParseFloat(m[1], 64)
	sec, _ := strconv.ParseFloat(m[2], 64)
	return 32 * 1.048576 / (min*60 + sec)
}

var rttRE = regexp.MustCompile(`min/avg/max = [\d.]+/([\d.]+)/`)

func (g *netGrid) rtt(ctx context.Context, from *computev1.ClassAd, addr string) string {
	out, _ := g.sh(ctx, from, "ping -c 10 -i 0.2 "+addr)
	if m := rttRE.FindStringSubmatch(out); m != nil {
		return m[1]
	}
	return "? (" + out + ")"
}
