package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

var (
	agentOnce sync.Once
	agentPath string
	agentErr  error
)

// GuestAgent builds the static guest agent (cmd/vmgrid-agent) once per test
// binary and returns its path.
func GuestAgent(tb testing.TB) string {
	tb.Helper()
	agentOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vmgrid-agent-")
		if err != nil {
			agentErr = err
			return
		}
		agentPath = filepath.Join(dir, "vmgrid-agent")
		cmd := exec.Command("go", "build", "-o", agentPath, "github.com/vmgrid/vmgrid/cmd/vmgrid-agent")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			agentErr = err
			agentPath = string(out)
		}
	})
	if agentErr != nil {
		tb.Fatalf("build the guest agent: %v: %s", agentErr, agentPath)
	}
	return agentPath
}

// NeedQEMU skips the test when QEMU is not installed (deploy/setup.sh
// installs it; CI always has it).
func NeedQEMU(tb testing.TB) {
	tb.Helper()
	for _, bin := range []string{"qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(bin); err != nil {
			tb.Skipf("%s is not installed (deploy/setup.sh installs it)", bin)
		}
	}
}

// ShortTempDir is a temporary directory with a short path (unix socket
// paths are limited to 107 bytes), removed when the test ends.
func ShortTempDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "vg")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
