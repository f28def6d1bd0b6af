package plant_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

// TestClonePSS measures the memory 8 clones of one image take on one
// plant (the sum of their QEMUs' PSS), lazy against eager: lazy clones
// share the golden's pages in the page cache until they write them. A
// measurement, not part of go test ./... (8 TCG guests): VMGRID_PSS=8.
func TestClonePSS(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("VMGRID_PSS"))
	if n == 0 {
		t.Skip("a measurement: set VMGRID_PSS=8 to run it")
	}
	testutil.NeedQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	is := startImages(t)
	publishGolden(t, ctx, is, "pss")
	for _, mode := range []string{"lazy", "eager"} {
		cs := startCompute(t, is.addr, func(c *computeserver.Config) { c.MemoryRestore = mode })
		var pids []int32
		for i := range n {
			ad, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{VmId: fmt.Sprintf("%s-%d", mode, i), Image: "pss"})
			if err != nil {
				t.Fatal(err)
			}
			pids = append(pids, ad.Pid)
		}
		time.Sleep(5 * time.Second) // let them settle
		var pss, rss int
		for _, pid := range pids {
			p, r := rollup(t, int(pid))
			pss, rss = pss+p, rss+r
		}
		t.Logf("%d %s clones: PSS %d MiB in all (%d MiB each), RSS %d MiB in all", n, mode, pss>>10, pss/n>>10, rss>>10)
		cs.stop()
	}
}

// rollup is a process's Pss and Rss in KiB.
func rollup(t *testing.T, pid int) (pss, rss int) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		n, _ := strconv.Atoi(f[1])
		switch f[0] {
		case "Pss:":
			pss = n
		case "Rss:":
			rss = n
		}
	}
	return pss, rss
}
