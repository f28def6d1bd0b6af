package plant

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/dag"
)

// The production line is a list of named steps (after flintlock's
// planner): each applies when its when says so (nil: always), does its
// work and returns how to undo it. A failed step undoes the steps before it
// in reverse order, so a failed creation leaves no process and no file.
// New stages (lazy memory, networks, migration) are steps added here.
var productionLine = []step{
	{name: "prepare", do: (*line).prepare},
	{name: "profile", when: (*line).profiled, do: (*line).startProfile}, // profile.go
	{name: "network", when: (*line).networked, do: (*line).network},
	{name: "stock machine", when: (*line).stockMachineNeeded, do: (*line).stockMachine}, // stock.go
	{name: "cloud-init seed", when: (*line).cloudInit, do: (*line).cloudInitSeed},       // cloudinit.go
	{name: "redo log", when: (*line).cloned, do: (*line).redoLog},
	{name: "generation id", when: (*line).newClone, do: (*line).generationID},
	{name: "restore", when: (*line).restored, do: (*line).restore},
	{name: "boot", when: (*line).booted, do: (*line).boot},
	{name: "agent", when: (*line).vmgridAgent, do: (*line).agent},
	{name: "qemu-ga", when: (*line).qemuGA, do: (*line).qemuGAWait},
	{name: "cloud-init", when: (*line).cloudInit, do: (*line).cloudInitWait},
	{name: "nic", when: func(l *line) bool { return l.networked() && l.hasAgent() && !l.cloudInit() }, do: (*line).plugNIC}, // cloud-init: the seed's network-config
	{name: "clock", when: (*line).hasAgent, do: (*line).clock},
	{name: "identity", when: (*line).renewIdentity, do: (*line).identity},
	{name: "actions", when: (*line).actionsLeft, do: (*line).actions},
	{name: "finish", do: (*line).finish},
	{name: "hydrate", when: (*line).lazy, do: (*line).hydrate},
}

// step is one stage of the production line.
type step struct {
	name string
	when func(*line) bool
	do   func(*line, context.Context) (undo func(), err error)
}

// agentTimeout bounds the wait for a guest agent to answer.
const agentTimeout = 2 * time.Minute

// line is one VM on its way down the production line.
type line struct {
	p        *Plant
	v        *vm
	src      *source
	plan     *dag.Plan
	progress Progress
	log      *zap.Logger
	start    time.Time
	fetched0 uint64
	spec     vmm.Spec
	ad       *computev1.ClassAd // the result
	seeded   *seed              // the cloud-init seed that carried the actions (cloudinit.go)
	prof     *profile           // working-set recording and prefetch (profile.go)
	// network.go: the NIC, its segment's MTU, whether it is hot-plugged
	// (and the ports that took), the MAC the guest has (the image's).
	nic        vmm.NIC
	mtu        int
	hotplug    bool
	hotplugged int
	current    string
	// early is the agent's channel, connected before a restored guest ran
	// (restoreMachine); the agent step takes it.
	early *agent.Client
}

// run runs the steps that apply; on failure it undoes what was done.
func (l *line) run(ctx context.Context) error {
	var undo []func()
	for _, s := range productionLine {
		if s.when != nil && !s.when(l) {
			continue
		}
		u, err := s.do(l, ctx)
		if u != nil {
			undo = append(undo, u)
		}
		if err != nil {
			err = l.upstreamCause(err)
			l.log.Warn("VM creation failed; cleaning up", zap.String("step", s.name), zap.Error(err))
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
			return err
		}
	}
	return nil
}

// upstreamCause names the cause of a failure when reads of the image gave
// up on an unreachable upstream meanwhile (Upstream.Unreachable): QEMU or
// the guest died of their I/O errors ("qemu … Input/output error"), which
// is no fault of the machine's, and the creation may succeed once the
// image server is back. Only the upstream's error is wrapped, so the code
// is Unavailable whatever the step's own error wraps; its text (with the
// console's tail) stays in the message.
func (l *line) upstreamCause(err error) error {
	up := l.p.cfg.Proxy.Upstream().Unreachable(l.start)
	if up == nil {
		return err
	}
	return fmt.Errorf("%w; so the VM failed: %s", up, err.Error())
}

func (l *line) cloned() bool   { return l.src.rootDisk == "" }
func (l *line) restored() bool { return l.src.config.Memory != "" }
func (l *line) booted() bool   { return l.src.config.Memory == "" }

// prepare makes the VM's directory and its machine spec, and starts
// fetching what QEMU reads first.
func (l *line) prepare(ctx context.Context) (func(), error) {
	v, src := l.v, l.src
	if err := os.MkdirAll(v.dir, 0o755); err != nil {
		return nil, err
	}
	undo := func() {
		if err := os.RemoveAll(v.dir); err != nil {
			l.log.Warn("remove VM directory", zap.String("dir", v.dir), zap.Error(err))
		}
	}
	spec := src.config.Spec
	spec.Name, spec.Dir = v.ad.VmId, v.dir
	kernel, initrd := src.config.Kernel, src.config.Initrd
	if src.config.Memory != "" && src.config.ResumeKernel != "" {
		// A restore: the kernel and initramfs are in the memory state.
		kernel, initrd = src.config.ResumeKernel, ""
		v.resumeKernel = true
	}
	spec.Kernel = filepath.Join(l.p.cfg.Mountpoint, src.image, kernel)
	if initrd != "" {
		spec.Initrd = filepath.Join(l.p.cfg.Mountpoint, src.image, initrd)
	}
	spec.Channels = []vmm.Channel{{Name: AgentChannel, Socket: filepath.Join(v.dir, "agent.sock")}}
	spec.Disks = append([]vmm.Disk(nil), spec.Disks...)
	if src.rootDisk != "" {
		spec.Disks[0].Path, spec.Disks[0].Format = src.rootDisk, vmm.Raw
		v.rootRW = src.rootDisk
	}
	l.spec = spec
	l.p.prefetch(ctx, src.image, kernel, src.config.Memory)
	return undo, nil
}

// redoLog makes a clone's redo log: a qcow2 overlay backed by the golden
// disk on the FUSE view (nothing is copied). Removed with the directory.
func (l *line) redoLog(ctx context.Context) (func(), error) {
	disk := &l.spec.Disks[0]
	disk.Path, disk.Format = filepath.Join(l.v.dir, "redo.qcow2"), vmm.QCOW2
	backing := filepath.Join(l.p.cfg.Mountpoint, l.src.image, l.src.config.Root)
	return nil, qemuImg(ctx, "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", disk.Path)
}

// restore starts the machine from the image's memory state, read through
// the FUSE view.
func (l *line) restore(ctx context.Context) (func(), error) {
	l.v.setState(computev1.VMState_VM_STATE_RESTORING)
	l.progress(computev1.VMState_VM_STATE_RESTORING, "restoring the memory state through the FUSE view")
	in, err := l.memory(ctx) // lazymem.go: lazy or eager, and the RAM backend
	if err == nil {
		var m vmm.Machine
		m, err = l.restoreMachine(ctx, in)
		var undo func()
		if undo, err = l.started(m, err); err == nil {
			return func() { undo(); l.v.mem.stop() }, nil
		}
	}
	l.v.mem.stop() // a streaming RAM file (lazymem.go)
	return nil, err
}

// restoreMachine starts QEMU on the memory state and, before the guest
// runs, connects to its agent's channel (vmm.Restore says why: a clone
// whose agent had answered the hello once hung on its clock step, the
// request dropped by the agent reopening its port).
func (l *line) restoreMachine(ctx context.Context, in vmm.Incoming) (vmm.Machine, error) {
	var early func(vmm.Machine)
	if l.vmgridAgent() {
		early = func(vmm.Machine) {
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			ac, err := agent.Dial(dctx, l.spec.Channels[0].Socket)
			if err != nil {
				l.log.Warn("dial the guest agent's channel before the guest runs", zap.Error(err))
				return
			}
			l.early = ac
		}
	}
	m, err := vmm.Restore(ctx, l.p.cfg.Driver, l.spec, in, early)
	if err != nil && l.early != nil {
		l.early.Close()
		l.early = nil
	}
	return m, err
}

// boot cold-boots an image that has no memory state.
func (l *line) boot(ctx context.Context) (func(), error) {
	l.v.setState(computev1.VMState_VM_STATE_RESTORING)
	l.progress(computev1.VMState_VM_STATE_RESTORING, "booting (the image has no memory state)")
	m, err := l.p.cfg.Driver.Start(ctx, l.spec)
	return l.started(m, err)
}

// started records a started machine (and, for a plant restarted later,
// which process it is) and returns how to stop it.
func (l *line) started(m vmm.Machine, err error) (func(), error) {
	if err != nil {
		return nil, err
	}
	v := l.v
	v.mu.Lock()
	v.m = m
	v.ad.Pid = int32(m.Pid())
	v.ad.ConsoleLog = filepath.Join(v.dir, "console.log")
	v.ad.AgentSocket = l.spec.Channels[0].Socket
	v.mu.Unlock()
	writeMachineFile(v.dir, m.Pid(), l.log)
	return func() { l.p.stopMachine(v) }, nil
}

// agent waits for the guest agent, and gives up at once if QEMU exits.
func (l *line) agent(ctx context.Context) (func(), error) {
	l.progress(computev1.VMState_VM_STATE_CONFIGURING, "waiting for the guest agent")
	l.v.setState(computev1.VMState_VM_STATE_CONFIGURING)
	var ac *agent.Client
	var err error
	if early := l.early; early != nil {
		l.early = nil
		ac, err = waitGuest(ctx, l.v.m, l.p.cfg.agentTimeout(), func(ctx context.Context) (*agent.Client, error) {
			if err := early.WaitReady(ctx); err != nil {
				early.Close()
				return nil, err
			}
			return early, nil
		})
	} else {
		ac, err = waitAgent(ctx, l.v.m, l.spec.Channels[0].Socket, l.p.cfg.agentTimeout())
	}
	if err != nil {
		return nil, fmt.Errorf("the guest agent of %s did not answer: %w", l.v.ad.VmId, err)
	}
	l.v.agent = ac
	return func() { ac.Close() }, nil
}

// clock sets the guest's clock, which stood still since the memory state
// was saved. A failure is logged only; a guest that does not answer at all
// (within agent.AnswerBound of a 5 s request) is stuck, and fails the
// creation with the end of its console.
func (l *line) clock(ctx context.Context) (func(), error) {
	req := agent.Request{Op: agent.OpSetTime, UnixNano: time.Now().UnixNano(), Timeout: agent.Duration(5 * time.Second)}
	if resp, err := l.v.agent.Do(ctx, req); errors.Is(err, agent.ErrNoAnswer) {
		return nil, fmt.Errorf("setting the guest's clock: %w (the guest answered its agent's hello before): %w\n--- guest console (tail) ---\n%s",
			err, errdefs.ErrUnavailable, tail(l.v.m.ConsoleLog(), 2000))
	} else if err != nil {
		l.log.Warn("could not set the guest clock", zap.Error(err))
	} else if resp.Error != "" {
		l.log.Warn("could not set the guest clock", zap.String("agent", resp.Error))
	}
	return nil, nil
}

// actions runs the configuration actions the golden image has not
// performed.
func (l *line) actions(ctx context.Context) (func(), error) {
	r := &runner{agent: l.v.agent, m: l.v.m, dir: l.v.dir, stageIn: l.p.stageIn(l.v), hotplugged: l.hotplugged}
	results, f := r.run(ctx, l.plan, func(s dag.Step) {
		l.progress(computev1.VMState_VM_STATE_CONFIGURING, fmt.Sprintf("action %s (%s)", s.Action.Id, s.Kind))
	})
	l.hotplugged = r.hotplugged
	if f != nil {
		return nil, fmt.Errorf("configuration %w: %w", f, errdefs.ErrFailedPrecondition)
	}
	l.v.mu.Lock()
	l.v.ad.Actions = results
	l.v.mu.Unlock()
	return nil, nil
}

// finish makes the VM RUNNING and writes its classad.
func (l *line) finish(context.Context) (func(), error) {
	v := l.v
	l.recordPerformed()
	v.mu.Lock()
	v.ad.State = computev1.VMState_VM_STATE_RUNNING
	v.ad.ReadyNanos = int64(time.Since(l.start))
	v.ad.FetchedBytes = l.p.fetched() - l.fetched0
	v.hotplugged = l.hotplugged
	l.ad = proto.Clone(v.ad).(*computev1.ClassAd)
	v.mu.Unlock()
	l.p.mu.Lock()
	l.p.images[l.src.image] += l.ad.FetchedBytes
	l.p.mu.Unlock()
	l.p.persist(v)
	l.log.Info("VM ready", zap.Duration("took", time.Since(l.start)), zap.Int("actions", len(l.plan.Todo())), zap.Uint64("fetched_bytes", l.ad.FetchedBytes))
	l.progress(computev1.VMState_VM_STATE_RUNNING, "ready")
	return nil, nil
}

// waitAgent dials a guest agent and waits until it answers, for at most
// timeout. It gives up as soon as the machine exits (a guest whose kernel
// panicked, a killed QEMU never answers), with the console's tail.
func waitAgent(ctx context.Context, m vmm.Machine, socket string, timeout time.Duration) (*agent.Client, error) {
	return waitGuest(ctx, m, timeout, func(ctx context.Context) (*agent.Client, error) {
		ac, err := agent.Dial(ctx, socket)
		if err == nil {
			if err = ac.WaitReady(ctx); err != nil {
				ac.Close()
			}
		}
		return ac, err
	})
}

// machineExited is the error of a machine that exited unasked: its status
// and the end of its console, which tells why (a kernel panic, an I/O
// error).
func machineExited(ctx context.Context, m vmm.Machine) error {
	status := "exit status 0"
	var me *vmm.MachineError
	if err := m.Wait(ctx); errors.As(err, &me) {
		status = me.Err.Error()
	} else if err != nil {
		status = err.Error()
	}
	return fmt.Errorf("the machine exited (%s) before its guest agent answered: %w\n--- guest console (tail) ---\n%s",
		status, errdefs.ErrUnavailable, tail(m.ConsoleLog(), 2000))
}
