//go:build faults

package faults

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/shop"
)

// The harness: real processes of the real binary, each in a process group
// of its own, logging to a file that is printed only when the test fails.

// etcdChild as the first argument makes the test binary an etcd server
// (etcd-child DIR CLIENT PEER) while vmgrid has no `vmgrid etcd` (see
// roleArgs).
const etcdChild = "etcd-child"

func TestMain(m *testing.M) {
	if len(os.Args) == 5 && os.Args[1] == etcdChild {
		os.Exit(runEtcdChild(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// runEtcdChild runs an embedded etcd until SIGTERM: the stand-in for
// `vmgrid etcd` on a branch that lacks it.
func runEtcdChild(f []string) int {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	e, err := shop.StartEtcd(f[0], f[1], f[2], true, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("etcd serving on", e.Endpoint)
	<-sig
	e.Close()
	return 0
}

// binary is bin/NAME of the module (make faults builds them), or $VMGRID_BIN_DIR/NAME.
func binary(t testing.TB, name string) string {
	t.Helper()
	dir := os.Getenv("VMGRID_BIN_DIR")
	if dir == "" {
		dir = filepath.Join("..", "..", "bin")
	}
	p, err := filepath.Abs(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s: %v (make faults builds it; or make build)", p, err)
	}
	return p
}

// needHost skips the suite where it cannot run: it mounts FUSE and runs
// QEMU guests under KVM.
func needHost(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the fault suite mounts FUSE and runs QEMU: it needs root")
	}
	for _, bin := range []string{"qemu-system-x86_64", "qemu-img", "fusermount3"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s is not installed (deploy/setup.sh installs it)", bin)
		}
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("no /dev/kvm")
	}
}

var (
	portsMu sync.Mutex
	ports   = map[string]bool{}
)

// freeAddr is a loopback address with a port free now and never handed
// out before in this run, so a role restarts on the ports it had.
func freeAddr(t testing.TB) string {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		a := l.Addr().String()
		l.Close()
		if !ports[a] {
			ports[a] = true
			return a
		}
	}
}

// proc is one process of a role. Its argv never changes: a restart runs
// the same command on the same ports and directories.
type proc struct {
	t       *testing.T
	name    string
	argv    []string
	env     []string
	addr    string // gRPC address that answers grpc.health.v1 when ready
	logPath string

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
}

// spawn starts argv and waits until addr is healthy; the process group is
// stopped, and the log printed if the test failed, when t ends.
func spawn(t *testing.T, name, addr string, argv []string, env ...string) *proc {
	t.Helper()
	logDir := filepath.Join(suiteDir(t), "logs")
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := &proc{t: t, name: name, argv: argv, env: env, addr: addr,
		logPath: filepath.Join(logDir, strings.ReplaceAll(name, "/", "_")+".log")}
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			printLog(t, p)
		}
	})
	p.start()
	return p
}

func printLog(t *testing.T, p *proc) {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return
	}
	const keep = 48 << 10
	if len(b) > keep {
		b = append([]byte("…\n"), b[len(b)-keep:]...)
	}
	t.Logf("--- log of %s (%s):\n%s", p.name, strings.Join(p.argv, " "), b)
}

func (p *proc) start() {
	p.t.Helper()
	lf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		p.t.Fatal(err)
	}
	defer lf.Close()
	fmt.Fprintf(lf, "=== start %s\n", time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(p.argv[0], p.argv[1:]...)
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("start %s: %v", p.name, err)
	}
	exited := make(chan struct{})
	p.mu.Lock()
	p.cmd, p.exited = cmd, exited
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		if lf, ferr := os.OpenFile(p.logPath, os.O_WRONLY|os.O_APPEND, 0); ferr == nil {
			fmt.Fprintf(lf, "=== exit %s: %v\n", time.Now().Format(time.RFC3339Nano), err)
			lf.Close()
		}
		p.mu.Lock()
		p.waitErr = err
		p.mu.Unlock()
		close(exited)
	}()
	if err := p.waitReady(60 * time.Second); err != nil {
		p.t.Fatalf("%s: %v", p.name, err)
	}
}

// waitReady polls grpc.health.v1 on the process's address.
func (p *proc) waitReady(d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		select {
		case <-p.exited:
			return fmt.Errorf("exited before serving: %v", p.waitErr)
		default:
		}
		if healthy(p.addr) == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not healthy after %v", d)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// healthy asks addr's grpc.health.v1 (no token: it is public) whether it serves.
func healthy(addr string) error {
	cc, err := services.Dial(addr, services.TLSFiles{})
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	r, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(false))
	if err != nil {
		return err
	}
	if r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("health: %v", r.GetStatus())
	}
	return nil
}

func (p *proc) pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd.Process.Pid
}

func (p *proc) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// kill9 sends SIGKILL to the process alone (not its group: what it started,
// QEMUs among them, is left as a crash leaves it) and waits for its end.
func (p *proc) kill9() {
	p.t.Helper()
	if err := syscall.Kill(p.pid(), syscall.SIGKILL); err != nil {
		p.t.Fatalf("kill -9 %s: %v", p.name, err)
	}
	<-p.exited
	faultsInjected.Add(1)
}

// stopGroup stops the process group with SIGTERM (SIGKILL after d).
func (p *proc) stopGroup(d time.Duration) error {
	if !p.running() {
		return nil
	}
	pid := p.pid()
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-p.exited:
		_ = syscall.Kill(-pid, syscall.SIGKILL) // what it left in its group
		return nil
	case <-time.After(d):
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		<-p.exited
		return fmt.Errorf("%s did not stop in %v after SIGTERM; killed", p.name, d)
	}
}

func (p *proc) stop() {
	if err := p.stopGroup(20 * time.Second); err != nil {
		p.t.Error(err)
	}
}

// restart runs the same command again and waits until it is healthy.
func (p *proc) restart() {
	p.t.Helper()
	if p.running() {
		p.t.Fatalf("restart of %s, which runs", p.name)
	}
	p.start()
}

// --- the suite's own directory, and what tests leave behind

var (
	suiteOnce sync.Once
	suiteRoot string
)

// suiteDir is one short directory for the whole run (unix socket paths are
// limited to 107 bytes), removed at the end by TestFaults.
func suiteDir(t testing.TB) string {
	suiteOnce.Do(func() {
		d, err := os.MkdirTemp("", "vgf")
		if err != nil {
			t.Fatal(err)
		}
		suiteRoot = d
	})
	return suiteRoot
}

// subDir is a new directory under the suite's.
func subDir(t testing.TB, name string) string {
	t.Helper()
	d, err := os.MkdirTemp(suiteDir(t), name)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// leftovers lists the processes (but this one) whose command line mentions
// dir: QEMUs a dead plant left, or anything else the suite started.
func leftovers(dir string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	self := os.Getpid()
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), dir) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// qemusUnder lists the QEMU processes whose command line mentions dir.
func qemusUnder(dir string) []int {
	var out []int
	for _, pid := range leftovers(dir) {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil && strings.HasPrefix(string(b), "qemu") {
			out = append(out, pid)
		}
	}
	return out
}

// killLeftovers SIGKILLs each pid (they are this suite's: their command
// lines name its directory) and reports those still there after 5 s
// (unkillable: in D state, e.g. hung on a dead FUSE mount).
func killLeftovers(pids []int) (unkillable []int) {
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for syscall.Kill(pid, 0) == nil && !zombie(pid) {
			if time.Now().After(deadline) {
				unkillable = append(unkillable, pid)
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return unkillable
}

func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && len(s) > i+2 && s[i+2] == 'Z'
}

// mounted reports whether dir is a mount point.
func mounted(dir string) bool {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}

// unmount removes a FUSE mount a killed plant left (lazily: a dead
// connection may not answer).
func unmount(dir string) error {
	if !mounted(dir) {
		return nil
	}
	if err := exec.Command("fusermount3", "-u", "-z", dir).Run(); err == nil {
		return nil
	}
	if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
		return errors.New(strings.TrimSpace(string(out)))
	}
	return nil
}
