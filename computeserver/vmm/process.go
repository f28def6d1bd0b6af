package vmm

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// ProcessStart is when process pid started (clock ticks since boot, field
// 22 of /proc/PID/stat): with the pid it names one process for good, where
// the pid alone is reused once the process is gone.
func ProcessStart(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces:
	// count fields after its closing parenthesis (field 3 onwards).
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// IsMachineOf reports whether pid is still the VMM a driver started for a
// machine whose Spec.Dir is dir: its command line names files in dir (QEMU's
// monitor socket and console log live there) and, when start is not 0, it
// started at start (see ProcessStart). A plant checks this before it kills
// a process group it knows only from a pid written down by an earlier run.
func IsMachineOf(pid int, start uint64, dir string) bool {
	if pid <= 0 || dir == "" {
		return false
	}
	if start != 0 {
		if got, err := ProcessStart(pid); err != nil || got != start {
			return false
		}
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	return bytes.Contains(cmdline, []byte(strings.TrimSuffix(dir, "/")+"/"))
}
