package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/vmgrid/vmgrid/computeserver/vnet"
	"github.com/vmgrid/vmgrid/computeserver/vnet/vnettest"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop"
)

// poller asks a guest's HTTP server every 10 ms over the domain's
// network, from a plant's dialer on the segment (a host of the domain,
// not the shop's port-forward: the path a peer VM's requests take), and
// records what an outside client sees: failed requests and the longest
// gap between two answered ones.
type poller struct {
	mu     sync.Mutex
	ok     int
	failed []string
	maxGap time.Duration
	gapAt  time.Time // when the longest gap ended
	lastOK time.Time
	// The request that ended the longest gap, and the retransmissions of
	// all (a segment lost in the switch costs its sender a retransmission
	// timeout: 200 ms at least, 1 s for a SYN).
	gapReq  request
	retrans int
	stop    chan struct{}
	stopped chan struct{}
}

func startPoller(nm *vnet.Manager, vni uint32, addr, want string) *poller {
	p := &poller{stop: make(chan struct{}), stopped: make(chan struct{})}
	go func() {
		defer close(p.stopped)
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			r, err := get(nm, vni, addr, want)
			now := time.Now()
			p.mu.Lock()
			p.retrans += r.retrans
			if err != nil {
				p.failed = append(p.failed, now.Format("15:04:05.000")+": "+err.Error())
			} else {
				if gap := now.Sub(p.lastOK); !p.lastOK.IsZero() && gap > p.maxGap {
					p.maxGap, p.gapAt, p.gapReq = gap, now, r
				}
				p.ok, p.lastOK = p.ok+1, now
			}
			p.mu.Unlock()
			select {
			case <-p.stop:
				return
			case <-t.C:
			}
		}
	}()
	return p
}

// request is what one of the poller's requests took.
type request struct {
	start          time.Time
	connect, total time.Duration
	retrans        int // segments the client retransmitted (SYNs too)
}

func (r request) String() string {
	return fmt.Sprintf("sent %s, connected in %d ms, answered in %d ms, %d segments retransmitted", r.start.Format("15:04:05.000"),
		r.connect.Milliseconds(), r.total.Milliseconds(), r.retrans)
}

// get is one HTTP/1.0 request (a new connection each time).
func get(nm *vnet.Manager, vni uint32, addr, want string) (r request, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	t0 := time.Now()
	r.start = t0
	c, err := nm.Dial(ctx, vni, addr)
	if err != nil {
		return r, err
	}
	r.connect = time.Since(t0)
	defer func() {
		r.retrans = retransmitted(c)
		c.Close()
	}()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		return r, err
	}
	b, err := io.ReadAll(c)
	r.total = time.Since(t0)
	if err != nil {
		return r, err
	}
	if !strings.Contains(string(b), want) {
		return r, fmt.Errorf("answer %q", b)
	}
	return r, nil
}

// retransmitted is how many segments the connection retransmitted.
func retransmitted(c net.Conn) int {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return 0
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return 0
	}
	n := 0
	_ = rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n = int(info.Total_retrans)
		}
	})
	return n
}

func (p *poller) answered() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ok
}

// end stops the poller and returns what it saw.
func (p *poller) end() (ok int, failed []string, maxGap time.Duration) {
	close(p.stop)
	<-p.stopped
	return p.ok, p.failed, p.maxGap
}

// gapRequest is, once ended, the request that ended the longest gap and
// the retransmissions of all.
func (p *poller) gapRequest() (request, int) { return p.gapReq, p.retrans }

// migrate migrates a VM through the shop and returns its classad and the
// phases it went through.
func (g *netGrid) migrate(ctx context.Context, owner, vmID, to string) (*computev1.ClassAd, []string, error) {
	return g.migrateWatching(ctx, owner, vmID, to, nil)
}

// migrateWatching is migrate calling each with every new phase.
func (g *netGrid) migrateWatching(ctx context.Context, owner, vmID, to string, each func(phase string)) (*computev1.ClassAd, []string, error) {
	stream, err := g.clients[owner].MigrateVM(ctx, &shopv1.MigrateVMRequest{VmId: vmID, To: to})
	if err != nil {
		return nil, nil, err
	}
	var phases []string
	for {
		p, err := stream.Recv()
		if err != nil {
			return nil, phases, err
		}
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
			if each != nil {
				each(p.Phase)
			}
		}
		if p.Classad != nil {
			return p.Classad, phases, nil
		}
	}
}

// twoPlants creates two VMs of alice's domain on two plants.
func (g *netGrid) twoPlants(ctx context.Context, t *testing.T, domain string) (a, b *computev1.ClassAd) {
	t.Helper()
	var err error
	if a, err = g.create(ctx, "alice", domain+"-a", domain); err != nil {
		t.Fatal(err)
	}
	for i := 0; b == nil || b.Plant == a.Plant; i++ {
		if i == 3 {
			t.Fatalf("no second VM of %s landed off plant %s", domain, a.Plant)
		}
		if b, err = g.create(ctx, "alice", fmt.Sprint(domain, "-b", i), domain); err != nil {
			t.Fatal(err)
		}
	}
	return a, b
}

func guestUptime(t *testing.T, out string) float64 {
	t.Helper()
	f, err := strconv.ParseFloat(strings.Fields(out)[0], 64)
	if err != nil {
		t.Fatalf("uptime %q: %v", out, err)
	}
	return f
}

// TestMigrate: a running VM serving HTTP moves between plants on separate
// hosts while a client on the domain's network asks it every 10 ms: no
// request fails; its disk (a file written before) and memory (its
// uptime, its server) come along; its old plant can go away after the
// switch. A destination that dies mid-migration leaves the VM running
// where it was and nothing on the destination. Another owner's VM and a
// VM that is not running are refused.
func TestMigrate(t *testing.T) {
	testutil.NeedQEMU(t)
	vnettest.NeedRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	g := startNetGrid(t, ctx, "pa", "pb", "pc")
	eventually(t, "three plants registered", func() bool { return g.registered(ctx) == 3 })
	svc, cli := g.twoPlants(ctx, t, "lab")
	third := "pa"
	for _, p := range []string{"pb", "pc"} {
		if p != svc.Plant && p != cli.Plant {
			third = p
		}
	}
	out, code := g.sh(ctx, svc, "mount -o remount,rw / && echo written-before > /root/before && sync && "+
		"mkdir -p /tmp/www && echo migrate-me > /tmp/www/index.html && httpd -p 8080 -h /tmp/www && cat /proc/uptime")
	if code != 0 {
		t.Fatalf("set up the guest: exit %d: %s", code, out)
	}
	up0, t0 := guestUptime(t, out), time.Now()
	addr := net.JoinHostPort(ipOf(svc), "8080")
	poll := startPoller(g.plants[cli.Plant].Line.Network(), svc.Network.Vni, addr, "migrate-me")
	defer func() {
		if poll != nil {
			poll.end()
		}
	}()
	eventually(t, "the poller gets answers", func() bool { return poll.answered() >= 10 })

	var moved *computev1.ClassAd
	t.Run("a running VM moves and answers all along", func(t *testing.T) {
		start := time.Now()
		ad, phases, err := g.migrate(ctx, "alice", svc.VmId, third)
		if err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		time.Sleep(time.Second) // the poller goes on after the switch
		ok, failed, gap := poll.end()
		t.Logf("the longest gap ended at %s", poll.gapAt.Format("15:04:05.000"))
		poll = nil
		st := ad.LastMigration
		t.Logf("migrated %s from %s to %s in %v (phases %v): longest gap %v over %d answers, %d failed; downtime %v (QEMU: %d ms); RAM %d of %d bytes, disk %d bytes, %d bytes between the plants",
			svc.VmId, svc.Plant, ad.Plant, took, phases, gap, ok, len(failed), time.Duration(st.GetDowntimeNanos()), st.GetQemuDowntimeMs(),
			st.GetRamBytes(), st.GetRamTotalBytes(), st.GetDiskBytes(), st.GetMovedBytes())
		if len(failed) > 0 {
			t.Errorf("%d requests failed during the migration: %v", len(failed), failed)
		}
		if ad.Plant != third || ad.State != computev1.VMState_VM_STATE_RUNNING || ad.MigratedFrom != svc.Plant {
			t.Fatalf("classad after the migration: plant %s state %s from %q", ad.Plant, ad.State, ad.MigratedFrom)
		}
		if ad.MemoryRestore != "migrated" || ad.MemoryLocalBytes != ad.MemoryBytes || ad.HydratedNanos != 0 {
			t.Errorf("the classad's memory after the migration: restore %q, %d of %d bytes local, hydrated %d ns; want migrated, all local",
				ad.MemoryRestore, ad.MemoryLocalBytes, ad.MemoryBytes, ad.HydratedNanos)
		}
		if got, err := g.clients["alice"].GetVM(ctx, &shopv1.GetVMRequest{VmId: svc.VmId}); err != nil || got.Plant != third || got.State != computev1.VMState_VM_STATE_RUNNING {
			t.Fatalf("the shop's classad: %v, %v", got, err)
		}
		if _, err := g.plants[svc.Plant].Line.GetVM(svc.VmId); !errdefs.IsNotFound(err) {
			t.Fatalf("the source still has the VM: %v", err)
		}
		if st.GetDiskBytes() == 0 || st.GetMovedBytes() < st.GetRamBytes()+st.GetDiskBytes() {
			t.Errorf("the stats do not add up: %+v", st)
		}
		moved = ad
		// Memory and disk: the uptime went on, the file is on the disk
		// (read past the page cache), the server is the same process.
		out, _ := g.sh(ctx, ad, "echo 3 > /proc/sys/vm/drop_caches; cat /root/before; cat /proc/uptime")
		lines := strings.Split(out, "\n")
		if len(lines) != 2 || lines[0] != "written-before" {
			t.Fatalf("after the migration: %q", out)
		}
		// The guest's clock stands still while it is paused for the switch
		// (under load, most of a second): only the rest must count.
		paused := time.Duration(st.GetDowntimeNanos()).Seconds()
		if up1, wall := guestUptime(t, lines[1]), time.Since(t0).Seconds(); up1 < up0+(wall-paused)*0.9 {
			t.Errorf("uptime %.2f s after %.2f s (%.2f s of it paused), was %.2f s: the guest did not keep counting", up1, wall, paused, up0)
		}
	})
	if moved == nil {
		t.FailNow()
	}

	t.Run("the source can go after the switch", func(t *testing.T) {
		g.stops[svc.Plant]()
		eventually(t, "the source left the registry", func() bool { return g.registered(ctx) == 2 })
		if _, err := get(g.plants[cli.Plant].Line.Network(), svc.Network.Vni, addr, "migrate-me"); err != nil {
			t.Fatalf("the VM stopped answering when its old plant went: %v", err)
		}
		if out, _ := g.sh(ctx, moved, "echo 3 > /proc/sys/vm/drop_caches; cat /root/before"); out != "written-before" {
			t.Fatalf("the file after the source went: %q", out)
		}
	})

	t.Run("a destination that dies leaves the VM where it was", func(t *testing.T) {
		dest := cli.Plant
		vmDir := filepath.Join(g.dirs[dest], "vms", svc.VmId)
		poll := startPoller(g.plants[cli.Plant].Line.Network(), svc.Network.Vni, addr, "migrate-me")
		what := "nothing"
		_, _, err := g.migrateWatching(ctx, "alice", svc.VmId, dest, func(phase string) {
			if phase == "copying" && what == "nothing" { // RAM is on its way
				what = killIncoming(vmDir)
			}
		})
		ok, failed, _ := poll.end()
		t.Logf("killed %s: migration: %v", what, err)
		if !strings.HasPrefix(what, "the incoming QEMU") {
			t.Fatalf("killed %s", what)
		}
		if errdefs.Code(err) != codes.Unavailable {
			t.Fatalf("migration with its destination killed: %v, want Unavailable", err)
		}
		if len(failed) > 0 || ok == 0 {
			t.Errorf("the poller: %d answers, failures %v", ok, failed)
		}
		ad, err := g.clients["alice"].GetVM(ctx, &shopv1.GetVMRequest{VmId: svc.VmId})
		if err != nil || ad.Plant != third || ad.State != computev1.VMState_VM_STATE_RUNNING {
			t.Fatalf("the VM after the failed migration: %v, %v", ad, err)
		}
		if out, _ := g.sh(ctx, ad, "cat /root/before"); out != "written-before" {
			t.Fatalf("the guest after the failed migration: %q", out)
		}
		// Nothing left on the destination: no VM, no directory, no tap.
		eventually(t, "the destination cleaned up", func() bool {
			_, err := g.plants[dest].Line.GetVM(svc.VmId)
			_, serr := os.Stat(vmDir)
			return errdefs.IsNotFound(err) && errors.Is(serr, os.ErrNotExist)
		})
		devs, _ := g.plants[dest].Line.Network().Devices()
		if tap := vnetTapName(g, dest, svc.VmId); strings.Contains(strings.Join(devs, " "), tap) {
			t.Fatalf("the destination kept the tap %s: %v", tap, devs)
		}
	})

	t.Run("refusals", func(t *testing.T) {
		_, _, err := g.migrate(ctx, "bob", svc.VmId, "")
		wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied, "another owner")
		_, _, err = g.migrate(ctx, "alice", svc.VmId, "no-such-plant")
		wantCode(t, err, errdefs.IsNotFound, codes.NotFound, "no-such-plant")
		_, _, err = g.migrate(ctx, "alice", svc.VmId, third)
		wantCode(t, err, errdefs.IsFailedPrecondition, codes.FailedPrecondition, "already")
		_, err = testutil.CreateVM(ctx, g.clients["alice"], &shopv1.CreateVMRequest{RequestId: "fails", Config: &computev1.ConfigDAG{
			Actions: []*computev1.Action{{Id: "fail", Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"false"}}}}}}})
		if err == nil {
			t.Fatal("a VM whose action fails was made")
		}
		failed := shop.VMID("alice", "fails")
		_, _, err = g.migrate(ctx, "alice", failed, "")
		wantCode(t, err, errdefs.IsFailedPrecondition, codes.FailedPrecondition, "not running")
	})
}

// killIncoming kills the machine of a VM migrating into vmDir (SIGKILL:
// the destination's QEMU dies mid-migration).
func killIncoming(vmDir string) string {
	b, err := os.ReadFile(filepath.Join(vmDir, "machine.json"))
	if err != nil {
		return err.Error()
	}
	var rec struct{ Pid int }
	if err := json.Unmarshal(b, &rec); err != nil || rec.Pid == 0 {
		return fmt.Sprintf("machine.json %q: %v", b, err)
	}
	if err := syscall.Kill(rec.Pid, syscall.SIGKILL); err != nil {
		return err.Error()
	}
	return fmt.Sprintf("the incoming QEMU (pid %d)", rec.Pid)
}

func vnetTapName(g *netGrid, plant, vmID string) string {
	c := g.plants[plant].Line.Network().Config()
	return c.TapName(vmID)
}
