package vmm

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// Driver starts virtual machines.
type Driver interface {
	// Start launches a machine as described by spec. ctx bounds the start
	// only (process launch and monitor handshake), not the machine's life.
	// With spec.Incoming the machine starts paused, loading a memory state;
	// call Resume to run it (or use Restore).
	Start(ctx context.Context, spec Spec) (Machine, error)
}

// Machine is one running VMM process and its guest.
type Machine interface {
	// Spec is the spec the machine runs with, defaults applied and paths
	// made absolute: Restore a suspended machine with it.
	Spec() Spec
	// Pid is the VMM's process id; the process leads its own process group.
	Pid() int
	// Exited is closed when the VMM process has exited and been reaped.
	Exited() <-chan struct{}
	// Wait blocks until the process exits; nil if it exited with status 0
	// (the guest powered off, or quit), else a *MachineError.
	Wait(ctx context.Context) error

	// WaitConsole waits until a complete line of the serial console
	// contains substr (lines printed before the call count) and returns
	// that line without its line ending. It fails with ErrExited if the
	// machine exits first.
	WaitConsole(ctx context.Context, substr string) (string, error)
	// ConsoleLog is everything the guest printed on its serial console.
	ConsoleLog() string

	// Status is QEMU's run state: running, paused, inmigrate, postmigrate, …
	Status(ctx context.Context) (string, error)
	// Pause stops the vCPUs; Continue starts them again.
	Pause(ctx context.Context) error
	Continue(ctx context.Context) error
	// Suspend saves the guest to the memory-state file path and ends the
	// machine. The disks are not copied: keep them (or the overlays on
	// top of them) unchanged until the state is restored. On failure the
	// machine keeps running as before and no file is left at path.
	Suspend(ctx context.Context, path string) error
	// Save writes the guest's state to path as Suspend does but leaves the
	// machine paused, its disks flushed and consistent with the state:
	// copy them now, then Continue runs the guest on (QEMU takes its disks
	// back). On failure the machine keeps running and no file is at path.
	Save(ctx context.Context, path string) error
	// Resume completes the incoming migration of a machine started with
	// Spec.Incoming and starts its vCPUs. The guest's clock is stale
	// afterwards (it stood still while suspended): set it from inside the
	// guest (the guest agent's job).
	Resume(ctx context.Context) error
	// QMP runs a monitor command: args are marshalled to JSON (nil for
	// none) and the return value is decoded into result (nil to ignore).
	QMP(ctx context.Context, command string, args, result any) error

	// Stop asks the VMM to quit and, if it has not exited when ctx ends
	// (or after the driver's stop timeout if ctx has no deadline), kills
	// its process group. Either way no process is left.
	Stop(ctx context.Context) error
	// Kill ends the process group with SIGKILL and waits for the exit.
	Kill() error
}

// ErrExited is returned when a machine exited before what was waited for.
var ErrExited = errors.New("machine exited")

// MachineError is an error of a machine with the evidence needed to
// understand it: the end of the guest's console and of QEMU's own output.
type MachineError struct {
	Machine string // Spec.Name
	Op      string // what was being done
	Err     error
	Console string // tail of the serial console
	QEMULog string // tail of QEMU's stderr/stdout
}

func (e *MachineError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "vmm: %s: %s: %v", orName(e.Machine), e.Op, e.Err)
	if e.QEMULog != "" {
		fmt.Fprintf(&b, "\n--- qemu output (tail) ---\n%s", e.QEMULog)
	}
	if e.Console != "" {
		fmt.Fprintf(&b, "\n--- guest console (tail) ---\n%s", e.Console)
	}
	return b.String()
}

func (e *MachineError) Unwrap() error { return e.Err }

// Restore starts a machine from a memory state written by Suspend and runs
// it: spec must describe the same devices, memory size and machine type as
// the suspended machine (its Machine.Spec(), with fresh Dir if wanted).
// The guest's clock must be set afterwards (see Machine.Resume).
//
// beforeRun, when set, runs after QEMU started and before the guest runs:
// connect the guest's channels there. A channel connected when the state
// was saved and found unconnected at the restore makes QEMU tell the guest
// its host went away (virtio-serial's post-load event), and a guest agent
// then reopens its port, dropping the request that arrives meanwhile.
func Restore(ctx context.Context, d Driver, spec Spec, in Incoming, beforeRun func(Machine)) (Machine, error) {
	spec.Incoming = &in
	m, err := d.Start(ctx, spec)
	if err != nil {
		return nil, err
	}
	if beforeRun != nil {
		beforeRun(m)
	}
	if err := m.Resume(ctx); err != nil {
		_ = m.Kill()
		return nil, err
	}
	return m, nil
}
