package plant

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

// leaveVM writes what a plant killed with a running VM leaves: the VM's
// directory with its classad naming pid.
func leaveVM(t *testing.T, plantDir, id string, pid int) string {
	t.Helper()
	dir := filepath.Join(plantDir, id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, _ := protojson.Marshal(&computev1.ClassAd{VmId: id, Pid: int32(pid)})
	if err := os.WriteFile(filepath.Join(dir, "classad.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// proc is a process the test started, leading its own group (as QEMU
// does); the test ends it.
type proc struct {
	pid  int
	done chan struct{} // closed when it exited
}

func startGroup(t *testing.T, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{pid: cmd.Process.Pid, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { _ = syscall.Kill(-p.pid, syscall.SIGKILL); <-p.done })
	return p
}

func (p *proc) alive() bool {
	select {
	case <-p.done:
		return false
	case <-time.After(200 * time.Millisecond):
		return true
	}
}

// TestRestartKillsOnlyItsOwnQEMU is issue 15 item 4: after a restart the
// plant SIGKILLed the process group of whatever pid classad.json named.
func TestRestartKillsOnlyItsOwnQEMU(t *testing.T) {
	root := testutil.ShortTempDir(t)
	plantDir := filepath.Join(root, "vms")
	// A pid reused by an unrelated process: it must survive.
	other := startGroup(t, "sleep", "1000")
	leaveVM(t, plantDir, "vm-reused", other.pid)
	// The machine the previous run started (its command line names its
	// directory, as QEMU's does): it must go.
	dir := filepath.Join(plantDir, "vm-left")
	mine := startGroup(t, "sh", "-c", "sleep 1000", "qemu", "-qmp", "unix:"+dir+"/qmp.sock")
	leaveVM(t, plantDir, "vm-left", mine.pid)
	writeMachineFile(dir, mine.pid, zap.NewNop())

	if _, err := New(Config{Dir: plantDir, MemoryMiB: 1024}); err != nil {
		t.Fatal(err)
	}
	if !other.alive() {
		t.Fatal("the plant killed an unrelated process whose pid a left classad named")
	}
	if mine.alive() {
		t.Fatal("the plant left its previous run's machine running")
	}
	if ents, _ := os.ReadDir(plantDir); len(ents) != 0 {
		t.Fatalf("left VM directories remain: %v", ents)
	}
}
