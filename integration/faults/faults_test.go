//go:build faults

package faults

import (
	"os"
	"strings"
	"testing"
	"time"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

// TestFaults starts one grid and breaks it in every way the audit did, one
// subtest per fault; each leaves the grid healthy for the next.
func TestFaults(t *testing.T) {
	needHost(t)
	begin := time.Now()
	root := suiteDir(t)
	// Registered first, so it runs last: after every process stopped.
	t.Cleanup(func() { finish(t, root, begin) })
	g := startGrid(t)
	t.Logf("grid up in %v (golden image built)", time.Since(begin).Round(time.Second))

	t.Run("smoke", func(t *testing.T) { g.smoke(t) })
	t.Run("kill9", func(t *testing.T) {
		t.Run("dataserver", g.kill9DataServer)
		t.Run("imageserver", g.kill9Images)
		t.Run("cacheproxy", g.kill9Proxy)
		t.Run("shop", g.kill9Shop)
		t.Run("plant", g.kill9Plant)
	})
	t.Run("etcd-outage", g.etcdOutages)
	t.Run("exfiltration", g.exfiltration)
	t.Run("unauthenticated", g.unauthenticated)
	t.Run("bad-inputs", g.badInputs)
	t.Run("upstream-gone-during-clone", func(t *testing.T) {
		t.Run("back-within-retry-fetching", g.upstreamBack(computev1.VMState_VM_STATE_FETCHING))
		t.Run("back-within-retry-restoring", g.upstreamBack(computev1.VMState_VM_STATE_RESTORING))
		t.Run("gone", g.upstreamGone)
	})
}

// finish checks nothing is left behind and logs the summary.
func finish(t *testing.T, root string, begin time.Time) {
	if pids := leftovers(root); len(pids) > 0 {
		t.Errorf("processes left behind: %v", pids)
		if bad := killLeftovers(pids); len(bad) > 0 {
			t.Errorf("unkillable: %v", bad)
		}
	}
	for _, m := range mountsUnder(root) {
		t.Errorf("mount left behind: %s", m)
		_ = unmount(m)
	}
	for _, l := range summary() {
		t.Log("SUMMARY " + l)
	}
	t.Logf("SUMMARY wall time %v", time.Since(begin).Round(time.Second))
	if !t.Failed() {
		os.RemoveAll(root)
	} else {
		t.Logf("kept %s for inspection", root)
	}
}

// mountsUnder lists the mount points below dir.
func mountsUnder(dir string) []string {
	b, _ := os.ReadFile("/proc/self/mounts")
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], dir+"/") {
			out = append(out, f[1])
		}
	}
	return out
}
