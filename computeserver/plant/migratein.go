package plant

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/qemuga"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Live migration, the destination's side (migrate.go has the whole). The
// source's MigrateIn stream carries three steps: PREPARE makes the machine
// (the VM claimed here as MIGRATING, a fresh redo log over the golden disk
// on this plant's view, the NIC's tap on the domain's segment but held off
// its bridge, QEMU waiting for the state with its disk served to the
// source's mirror), PLUG puts the tap on the bridge when the switch-over
// is near (the source's last rounds of RAM, or its pause at the latest:
// frames for the VM then wait in the tap, its guest seeing them once it
// runs here — those the source's guest had handled too are duplicates,
// which the guest's protocols drop), RUN runs the guest once the state is
// complete, announces it and ends the disk exports.
// A stream that ends before RUN has run the guest removes everything the
// steps made: a failed migration leaves nothing here.

// incoming is a VM migrating in.
type incoming struct {
	ticket   string       // what its tunnels present
	received atomic.Int64 // bytes through its tunnels
}

// MigrateInStream is the destination's end of a MigrateIn stream.
type MigrateInStream interface {
	Context() context.Context
	Send(*computev1.MigrateInResponse) error
	Recv() (*computev1.MigrateInRequest, error)
}

// incomingTimeout bounds the wait for the whole state once the source
// asked to run: the source's pre-copy has sent all but the last round.
const incomingTimeout = 2 * time.Minute

// MigrateIn receives a VM that migrates to this plant.
func (p *Plant) MigrateIn(s MigrateInStream) error {
	ctx := s.Context()
	req, err := s.Recv()
	if err != nil {
		return err
	}
	if req.Step != computev1.MigrateStep_MIGRATE_STEP_PREPARE {
		return fmt.Errorf("a migration starts with %s, not %s: %w", computev1.MigrateStep_MIGRATE_STEP_PREPARE, req.Step, errdefs.ErrInvalidArgument)
	}
	im, err := p.prepareIncoming(ctx, req)
	if err != nil {
		var me *vmm.MachineError
		if errors.As(err, &me) {
			return fmt.Errorf("%w: %w", err, errdefs.ErrUnavailable) // the machine failed, not the request
		}
		return err
	}
	ran := false
	defer func() {
		if !ran {
			im.abandon()
		}
	}()
	resp := &computev1.MigrateInResponse{Step: req.Step, Ticket: im.in.ticket}
	if n := p.cfg.Network; n != nil && im.v.ad.Network != nil {
		resp.VxlanEndpoint = n.Endpoint()
	}
	if err := s.Send(resp); err != nil {
		return err
	}
	for {
		req, err := s.Recv()
		if err != nil {
			return fmt.Errorf("vm %s: the source went away before the switch-over (%w); the machine made here is removed", im.v.ad.VmId, err)
		}
		switch req.Step {
		case computev1.MigrateStep_MIGRATE_STEP_PLUG:
			if err := im.plug(); err != nil {
				return err
			}
			if err := s.Send(&computev1.MigrateInResponse{Step: req.Step}); err != nil {
				return err
			}
		case computev1.MigrateStep_MIGRATE_STEP_RUN:
			t0 := time.Now()
			if err := im.run(ctx); err != nil {
				return err
			}
			ran = true
			resumed := time.Since(t0)
			im.ready(ctx)
			// The guest runs here now, whether or not the source hears it
			// (it asks with GetVM when the answer is lost).
			_ = s.Send(&computev1.MigrateInResponse{Step: req.Step, Classad: im.v.classad(), ResumedNanos: int64(resumed)})
			return nil
		default:
			return fmt.Errorf("step %s: want %s or %s: %w", req.Step, computev1.MigrateStep_MIGRATE_STEP_PLUG, computev1.MigrateStep_MIGRATE_STEP_RUN, errdefs.ErrInvalidArgument)
		}
	}
}

// inMachine is a machine being made for a VM migrating in.
type inMachine struct {
	p      *Plant
	v      *vm
	in     *incoming
	src    *source
	drives []string // served to the source's mirror
	// postCopy: the source switches to post-copy (userfaultfd on the
	// destination's RAM).
	postCopy bool
	// agentReady waits until the guest agent, connected before the state
	// came (dialAgent), answers.
	agentReady func(context.Context) error
	log        *zap.Logger
}

// prepareIncoming claims the VM and makes its machine, waiting for the
// state.
func (p *Plant) prepareIncoming(ctx context.Context, req *computev1.MigrateInRequest) (_ *inMachine, err error) {
	var spec vmm.Spec
	if err := json.Unmarshal(req.Machine, &spec); err != nil {
		return nil, fmt.Errorf("machine: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	ad := proto.Clone(req.Classad).(*computev1.ClassAd)
	ad.Plant, ad.State, ad.MigratedFrom, ad.Pid, ad.Error, ad.LastMigration = p.cfg.Name, computev1.VMState_VM_STATE_MIGRATING, req.Source, 0, "", nil
	if ad.MemoryRestore != "" {
		// The guest's RAM comes whole with the migration, into memory of
		// this plant's own (a memfd): none of it needs the image server.
		ad.MemoryRestore, ad.MemoryLocalBytes, ad.HydratedNanos = memoryMigrated, ad.MemoryBytes, 0
	}
	v, fresh, err := p.claim(ad.VmId, ad, 0)
	if err != nil {
		return nil, err
	}
	if !fresh {
		return nil, fmt.Errorf("vm %q is on plant %s already: %w", ad.VmId, p.cfg.Name, errdefs.ErrAlreadyExists)
	}
	im := &inMachine{p: p, v: v, in: &incoming{ticket: newTicket()}, postCopy: req.PostCopy, log: p.log.With(zap.String("vm", ad.VmId), zap.String("from", req.Source))}
	defer func() {
		if err != nil {
			im.abandon()
		}
	}()
	if im.src, err = p.source(ctx, ad.Image); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(v.dir, 0o755); err != nil {
		return nil, err
	}
	if err := im.machine(ctx, &spec); err != nil {
		return nil, err
	}
	v.mu.Lock()
	v.incoming = im.in
	v.mu.Unlock()
	p.persist(v)
	im.log.Info("machine ready for the incoming migration", zap.Strings("mirrored", im.drives))
	return im, nil
}

func newTicket() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// machine makes the spec this plant's (paths, sockets, RAM, the tap),
// makes the redo log and starts QEMU waiting for the state.
func (im *inMachine) machine(ctx context.Context, spec *vmm.Spec) error {
	p, v := im.p, im.v
	var err error
	if spec.Kernel, err = p.resolve(v.dir, spec.Kernel); err != nil {
		return err
	}
	if spec.Initrd, err = p.resolve(v.dir, spec.Initrd); err != nil {
		return err
	}
	for i := range spec.Disks {
		if err := im.disk(ctx, i, &spec.Disks[i]); err != nil {
			return err
		}
	}
	for i := range spec.Channels {
		spec.Channels[i].Socket = filepath.Join(v.dir, fmt.Sprintf("channel%d.sock", i))
	}
	if len(spec.Channels) > 0 {
		spec.Channels[0].Socket = filepath.Join(v.dir, "agent.sock")
	}
	if spec.MemoryFile != nil {
		spec.MemoryFile = &vmm.MemoryFile{Memfd: true}
	}
	spec.Name, spec.Dir, spec.Incoming = v.ad.VmId, v.dir, &vmm.Incoming{Live: true}
	tap, err := im.attach(spec)
	if err != nil {
		return err
	}
	m, err := p.cfg.Driver.Start(ctx, *spec)
	if tap != nil {
		tap.Close() // QEMU has its own
	}
	if err != nil {
		return err
	}
	v.mu.Lock()
	v.m = m
	v.mu.Unlock()
	writeMachineFile(v.dir, m.Pid(), im.log)
	if len(spec.Channels) > 0 {
		im.dialAgent(ctx, spec.Channels[0].Socket)
	}
	return vmm.ListenIncoming(ctx, m, "unix:"+filepath.Join(v.dir, incomingSock), filepath.Join(v.dir, incomingNBDSock), im.drives, im.postCopy)
}

// dialAgent connects to the guest agent's channel before the state
// arrives. The source's plant is connected to it, and the guest's port
// knows: were the destination's channel unconnected when the state loads,
// QEMU would tell the guest its host went away, and the guest's agent
// would reopen its port, dropping a request sent meanwhile. Connected
// first, the guest sees no change.
func (im *inMachine) dialAgent(ctx context.Context, sock string) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var ga guestAgent
	if GuestKind(im.src.manifest.GetAttributes()) == imagev1.GuestAgent_GUEST_AGENT_VMGRID {
		ac, err := agent.Dial(dctx, sock)
		if err != nil {
			im.log.Warn("dial the guest agent's channel", zap.Error(err))
			return
		}
		ga, im.agentReady = ac, ac.WaitReady
	} else {
		c, err := qemuga.Dial(dctx, sock)
		if err != nil {
			im.log.Warn("dial the guest agent's channel", zap.Error(err))
			return
		}
		ga, im.agentReady = &qgaAgent{c: c}, func(ctx context.Context) error { return c.Sync(ctx, time.Second) }
	}
	im.v.mu.Lock()
	im.v.agent = ga // closed by the teardown if the migration fails
	im.v.mu.Unlock()
}

// disk resolves one of the machine's disks; the source's redo log becomes
// a fresh one here, over the same golden disk, for the mirror to fill.
func (im *inMachine) disk(ctx context.Context, i int, d *vmm.Disk) error {
	local := len(d.Path) > len(rootVM) && d.Path[:len(rootVM)] == rootVM
	path, err := im.p.resolve(im.v.dir, d.Path)
	if err != nil {
		return err
	}
	d.Path = path
	if !local {
		return nil
	}
	if i != 0 || d.Format != vmm.QCOW2 || d.ReadOnly {
		return fmt.Errorf("disk %d (%s): only the redo log is local to a migrating VM: %w", i, filepath.Base(path), errdefs.ErrInvalidArgument)
	}
	backing := filepath.Join(im.p.cfg.Mountpoint, im.v.ad.Image, im.src.config.Root)
	if err := qemuImg(ctx, "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", path); err != nil {
		return err
	}
	im.drives = append(im.drives, vmm.DriveID(i))
	return nil
}

// attach gives the machine's NIC a tap on the VM's segment, held off its
// bridge until PLUG; it returns the plant's copy of the tap to close once
// QEMU has it.
func (im *inMachine) attach(spec *vmm.Spec) (*os.File, error) {
	n := im.v.ad.Network
	if n == nil {
		return nil, nil
	}
	if im.p.cfg.Network == nil {
		return nil, fmt.Errorf("plant %s has no guest networks: %w", im.p.cfg.Name, errdefs.ErrFailedPrecondition)
	}
	if len(spec.NICs) == 0 {
		return nil, fmt.Errorf("vm %q has a network but its machine no NIC: %w", im.v.ad.VmId, errdefs.ErrInvalidArgument)
	}
	host, err := ipNet(n.HostAddress)
	if err != nil {
		return nil, fmt.Errorf("network.host_address: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	at, err := im.p.cfg.Network.AttachHeld(n.Vni, host, im.v.ad.VmId)
	if err != nil {
		return nil, fmt.Errorf("network of %s: %w: %w", im.v.ad.VmId, err, errdefs.ErrUnavailable)
	}
	spec.NICs[0].Tap = at.Tap
	return at.Tap, nil
}

// plug: the switch-over is near: the tap joins the bridge, which sends
// the VM's frames to it (they wait there for the guest; those sent while
// the source is paused are lost there).
func (im *inMachine) plug() error {
	if n := im.v.ad.Network; n != nil {
		mac, err := net.ParseMAC(n.Mac)
		if err != nil {
			return fmt.Errorf("network.mac %q: %w: %w", n.Mac, err, errdefs.ErrInvalidArgument)
		}
		if err := im.p.cfg.Network.Plug(n.Vni, im.v.ad.VmId, mac); err != nil {
			return fmt.Errorf("%w: %w", err, errdefs.ErrUnavailable)
		}
	}
	return nil
}

// run waits for the complete state, runs the guest, announces it and ends
// the disk exports.
func (im *inMachine) run(ctx context.Context) error {
	m := im.v.m
	wctx, cancel := context.WithTimeout(ctx, incomingTimeout)
	defer cancel()
	t0 := time.Now()
	if err := vmm.WaitIncoming(wctx, m); err != nil {
		return err
	}
	loaded := time.Since(t0)
	if err := m.Continue(ctx); err != nil {
		return err
	}
	running := time.Since(t0)
	if err := vmm.Announce(ctx, m); err != nil {
		im.log.Warn("announce-self", zap.Error(err))
	}
	// The mirror finished before the state came: nothing uses the exports.
	if err := vmm.StopServingDrives(ctx, m, im.drives); err != nil {
		im.log.Warn("stop serving the drives to the source's mirror", zap.Error(err))
	}
	im.log.Info("the guest runs here", zap.Duration("state_loaded", loaded), zap.Duration("running", running), zap.Duration("announced", time.Since(t0)))
	return nil
}

// ready makes the VM RUNNING here: its agent reconnected, its classad
// written. The guest runs whatever the agent does.
func (im *inMachine) ready(ctx context.Context) {
	v := im.v
	spec := v.m.Spec()
	v.mu.Lock()
	ga := v.agent
	v.mu.Unlock()
	if ga != nil {
		_, err := waitGuest(ctx, v.m, im.p.cfg.agentTimeout(), func(ctx context.Context) (guestAgent, error) { return ga, im.agentReady(ctx) })
		if err != nil {
			im.log.Warn("the guest agent did not answer after the migration", zap.Error(err))
			ga.Close()
			ga = nil
		}
	}
	v.mu.Lock()
	v.agent, v.incoming = ga, nil
	v.ad.State, v.ad.Pid = computev1.VMState_VM_STATE_RUNNING, int32(v.m.Pid())
	v.ad.ConsoleLog = filepath.Join(v.dir, "console.log")
	if len(spec.Channels) > 0 {
		v.ad.AgentSocket = spec.Channels[0].Socket
	}
	v.mu.Unlock()
	im.p.persist(v)
	close(v.ready)
	im.log.Info("VM migrated in", zap.Int64("received_bytes", im.in.received.Load()))
}

// abandon removes what the migration made here.
func (im *inMachine) abandon() {
	p, v := im.p, im.v
	p.forget(v)
	v.err = fmt.Errorf("vm %q did not migrate to plant %s: %w", v.ad.VmId, p.cfg.Name, errdefs.ErrNotFound)
	close(v.ready)
	im.log.Info("incoming migration abandoned; its machine is removed")
}
