package vmm

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/vmgrid/vmgrid/imagebuild"
)

// These are integration tests: a real QEMU (TCG) boots Debian's cloud
// kernel and the tiny image built by imagebuild. They skip only when
// qemu-system-x86_64 is not installed (CI installs it).

// testHook is the guest's workload: it answers on the test channel, then
// prints a counter every 0.2 s, so a restored guest shows it continued
// where it was suspended instead of booting again. "vmgrid.test=poweroff"
// on the kernel command line makes it return at once (the guest then powers
// off).
const testHook = `case " $(cat /proc/cmdline) " in *" vmgrid.test=poweroff "*) echo "poweroff requested"; exit 0;; esac
for p in /sys/class/virtio-ports/*; do
	[ -e "$p/name" ] || continue
	n=$(cat "$p/name")
	echo "port $(basename "$p") name=$n"
	if [ "$n" = org.vmgrid.test.0 ]; then
		( exec 3<>"/dev/$(basename "$p")"; echo hello-from-guest >&3; read -r l <&3; echo "guest got: $l" ) &
	fi
done
i=0
while :; do i=$((i+1)); echo "tick $i"; sleep 0.2; done
`

const testChannel = "org.vmgrid.test.0"

var (
	imageOnce sync.Once
	image     *imagebuild.Image
	imageErr  error
	imageDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if imageDir != "" {
		os.RemoveAll(imageDir)
	}
	os.Exit(code)
}

// tinyImage builds the tiny image once per test binary (the kernel comes
// from the shared cache, imagebuild.DefaultCacheDir).
func tinyImage(t *testing.T) *imagebuild.Image {
	t.Helper()
	imageOnce.Do(func() {
		imageDir, imageErr = os.MkdirTemp("", "vmgrid-vmm-test-")
		if imageErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		start := time.Now()
		image, imageErr = (&imagebuild.Tiny{Hook: testHook}).Build(ctx, imageDir)
		if imageErr == nil {
			t.Logf("tiny image built in %v", time.Since(start))
		}
	})
	if imageErr != nil {
		t.Fatalf("build tiny image: %v", imageErr)
	}
	return image
}

func driver(t *testing.T) *QEMU {
	t.Helper()
	d := &QEMU{Logger: zaptest.NewLogger(t)}
	if !d.Available() {
		t.Skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86); skipping the VMM integration tests")
	}
	return d
}

// overlay creates a qcow2 clone of the golden disk: the clone's redo log.
func overlay(t *testing.T, golden string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "clone.qcow2")
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", golden, "-F", "raw", p).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	return p
}

func tinySpec(t *testing.T, img *imagebuild.Image, disk string) Spec {
	return Spec{
		Name:      t.Name(),
		Dir:       t.TempDir(),
		VCPUs:     img.Attributes.VCPUs,
		MemoryMiB: img.Attributes.MemoryMiB,
		Kernel:    img.Kernel,
		Initrd:    img.Initrd,
		Append:    img.Cmdline,
		Disks:     []Disk{{Path: disk, Format: QCOW2, Interface: DiskInterface(img.RootInterface)}},
	}
}

// requireGone fails unless the process and its group no longer exist.
func requireGone(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("process %d still exists (kill 0: %v)", pid, err)
	}
	if err := syscall.Kill(-pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("process group %d still exists (kill 0: %v)", pid, err)
	}
}

var tickLine = regexp.MustCompile(`^tick (\d+)$`)

// lastTick is the last complete counter line in a console log.
func lastTick(t *testing.T, log string) int {
	t.Helper()
	last := -1
	for _, l := range strings.Split(log, "\n") {
		if m := tickLine.FindStringSubmatch(strings.TrimRight(l, "\r")); m != nil {
			last, _ = strconv.Atoi(m[1])
		}
	}
	if last < 0 {
		t.Fatalf("no counter on the console:\n%s", log)
	}
	return last
}

// waitTick waits for counter line n (the first line containing "tick n" is
// that line: the counter only grows).
func waitTick(t *testing.T, ctx context.Context, m Machine, n int) {
	t.Helper()
	if _, err := m.WaitConsole(ctx, fmt.Sprintf("tick %d", n)); err != nil {
		t.Fatal(err)
	}
}

func fileSize(t *testing.T, p string) int64 {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// Boot the tiny image from a qcow2 clone, talk over the virtio-serial
// channel, suspend it to a memory-state file, restore it in a new QEMU
// process and check the guest carried on from where it was.
func TestBootSuspendResume(t *testing.T) {
	d := driver(t)
	img := tinyImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	spec := tinySpec(t, img, overlay(t, img.RootDisk))
	sock := filepath.Join(spec.Dir, "agent.sock")
	spec.Channels = []Channel{{Name: testChannel, Socket: sock}}
	start := time.Now()
	m, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	marker, err := m.WaitConsole(ctx, imagebuild.ReadyMarker)
	if err != nil {
		t.Fatal(err)
	}
	boot := time.Since(start)
	t.Logf("boot to marker: %v (guest says %q)", boot, marker)

	// The channel: the guest writes first, then echoes what it reads.
	if _, err := m.WaitConsole(ctx, "name="+testChannel); err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "hello-from-guest" {
		t.Fatalf("channel: read %q, %v", line, err)
	}
	if _, err := io.WriteString(conn, "ping\n"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WaitConsole(ctx, "guest got: ping"); err != nil {
		t.Fatal(err)
	}
	conn.Close()

	waitTick(t, ctx, m, 5)
	if st, err := m.Status(ctx); err != nil || st != "running" {
		t.Fatalf("status %q, %v; want running", st, err)
	}
	state := filepath.Join(t.TempDir(), "mem.state")
	pid := m.Pid()
	start = time.Now()
	if err := m.Suspend(ctx, state); err != nil {
		t.Fatal(err)
	}
	suspend := time.Since(start)
	requireGone(t, pid)
	size := fileSize(t, state)
	t.Logf("suspend: %v, memory state %.1f MB for %d MiB of RAM", suspend, float64(size)/1e6, spec.MemoryMiB)
	if size < 1<<20 || size > int64(spec.MemoryMiB)<<20*6/10 {
		t.Errorf("memory state is %d bytes; expected well below RAM (zero pages left out)", size)
	}
	if _, err := os.Stat(state + ".partial"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("partial state file left behind: %v", err)
	}
	before := lastTick(t, m.ConsoleLog())

	// Restore on a new process with the same devices; new working directory.
	spec2 := m.Spec()
	spec2.Dir = t.TempDir()
	spec2.Channels = []Channel{{Name: testChannel, Socket: filepath.Join(spec2.Dir, "agent.sock")}}
	start = time.Now()
	m2, err := Restore(ctx, d, spec2, Incoming{Path: state}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Kill()
	resume := time.Since(start)
	first, err := m2.WaitConsole(ctx, "tick ")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("resume: %v to running; first line after resume %q (last before suspend: tick %d) after %v",
		resume, first, before, time.Since(start))
	after, err := strconv.Atoi(strings.TrimPrefix(first, "tick "))
	if err != nil {
		t.Fatalf("unexpected first line %q", first)
	}
	// The line being printed at the moment of suspend may be split across
	// the two logs, so the first complete line can skip one.
	if after != before+1 && after != before+2 {
		t.Fatalf("counter went from %d to %d: the guest did not continue where it was suspended", before, after)
	}
	waitTick(t, ctx, m2, after+3)
	if strings.Contains(m2.ConsoleLog(), imagebuild.ReadyMarker) {
		t.Fatalf("the restored guest booted again:\n%s", m2.ConsoleLog())
	}
	if st, err := m2.Status(ctx); err != nil || st != "running" {
		t.Fatalf("restored status %q, %v; want running", st, err)
	}

	pid2 := m2.Pid()
	start = time.Now()
	if err := m2.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("stop: %v", time.Since(start))
	requireGone(t, pid2)
	if err := m2.Wait(ctx); err != nil {
		t.Errorf("quit should be a clean exit: %v", err)
	}
	if _, err := os.Stat(filepath.Join(spec2.Dir, qmpSocketName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("monitor socket left behind: %v", err)
	}
}

// RAM backed by a shared file: the state stream leaves RAM out (it is the
// file), and a clone maps the file privately (copy-on-write), reading it on
// demand and never writing it.
func TestLazyMemoryRestore(t *testing.T) {
	d := driver(t)
	img := tinyImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	ram := filepath.Join(t.TempDir(), "ram")
	spec := tinySpec(t, img, overlay(t, img.RootDisk))
	spec.MemoryFile = &MemoryFile{Path: ram, Share: true}
	m, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	waitTick(t, ctx, m, 3)
	state := filepath.Join(t.TempDir(), "mem.state")
	start := time.Now()
	if err := m.Suspend(ctx, state); err != nil {
		t.Fatal(err)
	}
	size := fileSize(t, state)
	t.Logf("suspend with shared RAM file: %v, state %.2f MB, RAM file %d MiB", time.Since(start), float64(size)/1e6, fileSize(t, ram)>>20)
	if size > 8<<20 {
		t.Errorf("state is %d bytes: RAM was not left out", size)
	}
	before := lastTick(t, m.ConsoleLog())
	sum := func() [32]byte {
		b, err := os.ReadFile(ram)
		if err != nil {
			t.Fatal(err)
		}
		return sha256.Sum256(b)
	}
	ramSum := sum()

	spec2 := m.Spec()
	spec2.Dir = t.TempDir()
	spec2.MemoryFile = &MemoryFile{Path: ram, Share: false}
	start = time.Now()
	m2, err := Restore(ctx, d, spec2, Incoming{Path: state, IgnoreShared: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Kill()
	t.Logf("lazy resume: %v", time.Since(start))
	first, err := m2.WaitConsole(ctx, "tick ")
	if err != nil {
		t.Fatal(err)
	}
	after, _ := strconv.Atoi(strings.TrimPrefix(first, "tick "))
	if after != before+1 && after != before+2 {
		t.Fatalf("counter went from %d to %q", before, first)
	}
	waitTick(t, ctx, m2, after+3)
	if err := m2.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if sum() != ramSum {
		t.Fatal("the clone wrote to the RAM file it maps privately")
	}
}

// The same root disk boots from NVMe without the initramfs (the kernel has
// NVMe and ext4 built in), but QEMU cannot migrate NVMe: Suspend fails, says
// why, and leaves the guest running.
func TestNVMeBootsButCannotSuspend(t *testing.T) {
	d := driver(t)
	img := tinyImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	spec := tinySpec(t, img, overlay(t, img.RootDisk))
	spec.Initrd = ""
	spec.Append = imagebuild.TinyCmdlineNVMe
	spec.Disks[0].Interface = NVMe
	start := time.Now()
	m, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	if _, err := m.WaitConsole(ctx, imagebuild.ReadyMarker); err != nil {
		t.Fatal(err)
	}
	t.Logf("NVMe boot to marker without initramfs: %v", time.Since(start))
	waitTick(t, ctx, m, 2)
	state := filepath.Join(t.TempDir(), "mem.state")
	err = m.Suspend(ctx, state)
	if err == nil || !strings.Contains(err.Error(), "non-migratable") {
		t.Fatalf("Suspend with an NVMe disk: %v; want QEMU's non-migratable error", err)
	}
	if _, serr := os.Stat(state); !errors.Is(serr, os.ErrNotExist) {
		t.Errorf("a failed suspend left %s behind", state)
	}
	if st, err := m.Status(ctx); err != nil || st != "running" {
		t.Fatalf("after a failed suspend the machine is %q (%v); want running", st, err)
	}
	n := lastTick(t, m.ConsoleLog())
	waitTick(t, ctx, m, n+2)
	if err := m.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	requireGone(t, m.Pid())
}

// The guest's init powers off when its hook returns: QEMU exits by itself
// with status 0, and a console wait ends with ErrExited.
func TestGuestPowerOff(t *testing.T) {
	d := driver(t)
	img := tinyImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	spec := tinySpec(t, img, overlay(t, img.RootDisk))
	spec.Append += " quiet vmgrid.test=poweroff"
	m, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	_, err = m.WaitConsole(ctx, "a line the guest never prints")
	if !errors.Is(err, ErrExited) {
		t.Fatalf("WaitConsole: %v; want ErrExited", err)
	}
	if err := m.Wait(ctx); err != nil {
		t.Fatalf("Wait: %v", err)
	}
	log := m.ConsoleLog()
	if !strings.Contains(log, imagebuild.ReadyMarker) || !strings.Contains(log, "hook exited with status 0") {
		t.Fatalf("unexpected console:\n%s", log)
	}
	requireGone(t, m.Pid())
}

// A QEMU that does not answer its monitor is killed when Stop's context
// ends; nothing is left behind.
func TestStopKillsUnresponsiveQEMU(t *testing.T) {
	d := driver(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// No kernel, no disk: the firmware finds nothing to boot and waits.
	m, err := d.Start(ctx, Spec{Name: "stuck", Dir: t.TempDir(), MemoryMiB: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	if err := syscall.Kill(m.Pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopCtx, stopCancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer stopCancel()
	start := time.Now()
	if err := m.Stop(stopCtx); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("Stop took %v", took)
	}
	requireGone(t, m.Pid())
	if err := m.Wait(ctx); err == nil {
		t.Error("a killed QEMU should not report a clean exit")
	}
}

// A QEMU that cannot start explains why: its own output is in the error.
func TestStartErrorShowsQEMUOutput(t *testing.T) {
	d := driver(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := d.Start(ctx, Spec{Dir: t.TempDir(), Disks: []Disk{{Path: "/nonexistent/disk.raw"}}})
	var me *MachineError
	if !errors.As(err, &me) || !errors.Is(err, ErrExited) {
		t.Fatalf("Start: %v; want a *MachineError wrapping ErrExited", err)
	}
	t.Logf("Start error: %v", err)
	if !strings.Contains(err.Error(), "/nonexistent/disk.raw") {
		t.Fatalf("error does not carry QEMU's complaint:\n%v", err)
	}
}

// KVMWorks must answer within its time limit and leave nothing behind;
// on the project's nested hosts the answer is false.
func TestKVMProbe(t *testing.T) {
	d := driver(t)
	img := tinyImage(t)
	start := time.Now()
	ok := KVMWorks(context.Background(), d, img.Kernel, 3*time.Second)
	took := time.Since(start)
	t.Logf("KVMWorks = %v after %v", ok, took)
	if took > 8*time.Second {
		t.Errorf("probe took %v, limit was 3s", took)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), "guest=kvm-probe") {
			t.Errorf("a KVM probe QEMU is still running: %s", p)
		}
	}
}

func TestSpecArgs(t *testing.T) {
	spec, err := prepare(Spec{
		Dir:    "/tmp/vm,1",
		Kernel: "/k/vmlinuz",
		Append: "console=ttyS0",
		Disks: []Disk{
			{Path: "/d/root.qcow2", Format: QCOW2, Interface: NVMe},
			{Path: "/d/data.raw", ReadOnly: true, Interface: NVMe},
			{Path: "/d/v.raw", Cache: "none"},
		},
		Channels:   []Channel{{Name: "org.vmgrid.agent.0", Socket: "/tmp/a.sock"}},
		MemoryFile: &MemoryFile{Path: "/m/ram"},
		Incoming:   &Incoming{Path: "/s/mem.state"},
	})
	if err != nil {
		t.Fatal(err)
	}
	args := strings.Join(spec.args("tcg"), " ")
	for _, want := range []string{
		"-accel tcg", "-m 256M", "-smp 1", "-nodefaults", "-no-user-config", "-display none",
		"-qmp unix:/tmp/vm,,1/qmp.sock,server=on,wait=off",
		"-chardev socket,id=console0,server=on,wait=off,path=/tmp/vm,,1/console.sock,logfile=/tmp/vm,,1/console.log -serial chardev:console0",
		"-object memory-backend-file,id=ram0,size=256M,mem-path=/m/ram,share=off -machine q35,memory-backend=ram0",
		"-drive if=none,id=disk0,file=/d/root.qcow2,format=qcow2 -device nvme,id=nvme0,serial=vmgrid0 -device nvme-ns,drive=disk0,bus=nvme0,nsid=1",
		"-drive if=none,id=disk1,file=/d/data.raw,format=raw,readonly=on -device nvme-ns,drive=disk1,bus=nvme0,nsid=2",
		"-drive if=none,id=disk2,file=/d/v.raw,format=raw,cache=none -device virtio-blk-pci,drive=disk2",
		"-device virtio-serial-pci,id=vserial0 -chardev socket,id=channel0,path=/tmp/a.sock,server=on,wait=off -device virtserialport,bus=vserial0.0,chardev=channel0,name=org.vmgrid.agent.0",
		"-S -incoming defer",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("command line lacks %q:\n%s", want, args)
		}
	}
	bad := []Spec{
		{},
		{Dir: "/tmp/" + strings.Repeat("x", 120)},
		{Dir: "/tmp/x", Append: "console=ttyS0"},
		{Dir: "/tmp/x", Disks: []Disk{{Path: "/d", Format: "vmdk"}}},
		{Dir: "/tmp/x", Incoming: &Incoming{Path: "/s", IgnoreShared: true}},
		{Dir: "/tmp/x", Accel: "hvf"},
	}
	for i, s := range bad {
		if _, err := prepare(s); err == nil {
			t.Errorf("bad spec %d accepted: %+v", i, s)
		}
	}
}
