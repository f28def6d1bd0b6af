//go:build compose

package compose

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// settle is every test's cleanup: it destroys the owner's VMs, brings the
// grid back to its shape (three etcd members, two shops, three plants, a
// killed plant's container removed: its replacement is a new plant), and
// fails the test when a plant still runs a QEMU or holds a mount beyond
// its FUSE view, or a QEMU of the project's containers is left on the host.
func settle(t *testing.T) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if t.Failed() {
			g.keepLogs(t)
		}
		g.reshape(t)
		c := g.shop(t, 1)
		eventuallyWhy(t, 2*time.Minute, "destroy every VM", func() (bool, string) {
			l, err := c.ListVMs(ctx, &shopv1.ListVMsRequest{})
			if err != nil {
				return false, err.Error()
			}
			var left []string
			for _, ad := range l.GetVms() {
				_, err := c.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: ad.GetVmId()})
				left = append(left, fmt.Sprintf("%s on %s %s (destroy: %v)", ad.GetVmId(), ad.GetPlant(), ad.GetState(), err))
			}
			return len(left) == 0, strings.Join(left, "; ")
		})
		eventually(t, 30*time.Second, "no QEMU and only the FUSE views in any plant", func() bool {
			for name := range g.containers(t, "plant") {
				q, _ := docker("exec", name, "sh", "-c", "pgrep -c qemu-system || true")
				m, _ := docker("exec", name, "sh", "-c", "grep -c ' fuse' /proc/mounts || true")
				if strings.TrimSpace(q) != "0" || strings.TrimSpace(m) != "2" { // the view and its -mem view of RAM files
					t.Logf("%s: %s QEMU, %s FUSE mounts", name, strings.TrimSpace(q), strings.TrimSpace(m))
					return false
				}
			}
			return len(hostQEMUs(t)) == 0
		})
	})
}

// reshape removes exited plant containers and brings every service back
// to its scale, then waits for them to be healthy.
func (gr *grid) reshape(t *testing.T) {
	t.Helper()
	if out, _ := docker("ps", "-aq", "--filter", "label=com.docker.compose.project="+gr.project,
		"--filter", "label=com.docker.compose.service=plant", "--filter", "status=exited"); strings.TrimSpace(out) != "" {
		if _, err := docker(append([]string{"rm", "-v"}, strings.Fields(out)...)...); err != nil {
			t.Error(err)
		}
	}
	if _, err := gr.compose("up", "-d", "--no-recreate", "--scale", "plant=3", "--scale", "shop=2"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Minute, "every container healthy", func() bool {
		out, err := docker("ps", "--filter", "label=com.docker.compose.project="+gr.project, "--format", "{{.Status}}")
		return err == nil && strings.Count(out, "(healthy)") == 11 // 3 etcd, images, data, cache, 2 shops, 3 plants
	})
}

// hostQEMUs lists the host's QEMU processes in the project's containers
// (their cgroups name the container): none may outlive a test's VMs.
func hostQEMUs(t testing.TB) []string {
	out, err := docker("ps", "-aq", "--no-trunc", "--filter", "label=com.docker.compose.project="+g.project)
	if err != nil {
		t.Fatal(err)
	}
	ids := strings.Fields(out)
	procs, _ := filepath.Glob("/proc/[0-9]*/comm")
	var found []string
	for _, p := range procs {
		comm, err := os.ReadFile(p)
		if err != nil || !strings.HasPrefix(string(comm), "qemu-system") {
			continue
		}
		cg, _ := os.ReadFile(filepath.Join(filepath.Dir(p), "cgroup"))
		for _, id := range ids {
			if strings.Contains(string(cg), id) {
				found = append(found, filepath.Base(filepath.Dir(p)))
			}
		}
	}
	return found
}
