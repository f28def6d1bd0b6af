package plant

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/computeserver/vmm"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Live migration, the source's side (Goiri et al. §4: "tasks can be
// migrated … since it is not necessary to transfer the VM image, while
// maintaining their accessibility during the whole process").
//
// What is local to this plant is the clone's redo log; the golden disk, the
// kernel and the RAM file are the image server's, which the destination
// reads through its own FUSE view. So the destination's machine gets a
// fresh redo log over the same golden disk, QEMU mirrors the source's
// redo log into it (only its written clusters: blockdev-mirror sync=top,
// kept in step by write-blocking copies until the switch), and pre-copies
// RAM. Both of QEMU's streams run through MigrationTunnel, gRPC streams
// the source plant opens to the destination with its service token: the
// plants' one authenticated channel, and the count of every byte that
// moves between them. The destination's tap joins its segment when the
// switch-over is near (frames for the VM wait there for the guest, none
// lost while the source pauses); the source pauses before the
// switch-over, the mirror is finished, then the device state
// goes, the destination runs the guest and announces it, and this plant
// lets the VM go. The disk moved before the switch, so nothing on this
// plant is needed after it: a source that dies then takes nothing along.
//
// Why a mirror rather than serving the redo log to the destination through
// the block read API (the destination's FUSE view reading it on demand):
// the redo log is a qcow2 that the source's QEMU writes until the switch,
// and the block API serves files whose meta-data (size, digests) were fixed
// at publish; the destination would also need a three-layer chain (its own
// overlay over the source's redo log over the golden, with the backing
// path rewritten) and a block-stream after the switch, during which the VM
// still depends on the source. A redo log is small (what the guest wrote),
// the mirror moves exactly it, once, and the source is free at the switch.

// tunnelChunk is what one TunnelData message carries at most.
const tunnelChunk = 256 << 10

// migrateTimeout bounds a migration whose caller set no deadline.
const migrateTimeout = 10 * time.Minute

// peerWait bounds the wait for the source's segment to flood to the
// destination (the registry's refresh): a switch before it would cut the
// VM off from this plant's side of the domain.
const peerWait = 15 * time.Second

// MigrateProgress receives a migration's progress.
type MigrateProgress func(phase, msg string, stats *computev1.MigrationStats)

// Paths in a migrated machine's spec are the plant's own; on the wire
// they are relative to one of these roots.
const (
	rootVM   = "vm:"   // the VM's directory
	rootView = "view:" // the FUSE view
	rootMem  = "mem:"  // the memory view
)

// MigrateVM moves a running VM to the destination while its guest runs on,
// and returns its classad there. On an error the VM runs on here.
func (p *Plant) MigrateVM(ctx context.Context, req *computev1.MigrateVMRequest, progress MigrateProgress) (*computev1.ClassAd, error) {
	start := time.Now()
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, migrateTimeout)
		defer cancel()
	}
	v, err := p.migratable(req)
	if err != nil {
		return nil, err
	}
	defer v.endMigration()
	mo, err := p.outgoing(v, req)
	if err != nil {
		return nil, err
	}
	cc, err := p.cfg.DialPlant(req.Destination.Addr)
	if err != nil {
		return nil, fmt.Errorf("dial plant %s: %w: %w", req.Destination.Plant, err, errdefs.ErrUnavailable)
	}
	defer cc.Close()
	o := &outgoing{p: p, v: v, req: req, mo: mo, cc: cc, start: start, progress: progress,
		log: p.log.With(zap.String("vm", v.ad.VmId), zap.String("to", req.Destination.Plant))}
	ad, err := o.run(ctx)
	if err != nil {
		o.log.Warn("migration failed; the VM runs on here", zap.Error(err))
		return nil, err
	}
	return ad, nil
}

// migratable checks the VM can move live now, and marks it migrating.
func (p *Plant) migratable(req *computev1.MigrateVMRequest) (*vm, error) {
	id := req.VmId
	if p.cfg.DialPlant == nil {
		return nil, fmt.Errorf("plant %s cannot reach other plants (it has no service token): %w", p.cfg.Name, errdefs.ErrFailedPrecondition)
	}
	if req.Destination.Plant == p.cfg.Name {
		return nil, fmt.Errorf("vm %q is on plant %s already: %w", id, p.cfg.Name, errdefs.ErrFailedPrecondition)
	}
	v, err := p.lookup(id)
	if err != nil {
		return nil, err
	}
	select {
	case <-v.ready:
	default:
		return nil, fmt.Errorf("vm %q is still being made: %w", id, errdefs.ErrFailedPrecondition)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	switch {
	case v.m == nil || v.ad.State != computev1.VMState_VM_STATE_RUNNING:
		return nil, fmt.Errorf("vm %q is %s, not running: %w", id, v.ad.State, errdefs.ErrFailedPrecondition)
	case v.migrating:
		return nil, fmt.Errorf("vm %q is migrating already: %w", id, errdefs.ErrFailedPrecondition)
	case v.ad.PersistentDisk != "":
		return nil, fmt.Errorf("vm %q has a persistent disk, which does not move live yet; suspend it and resume it elsewhere: %w", id, errdefs.ErrFailedPrecondition)
	case v.hotplugged > 0:
		return nil, fmt.Errorf("vm %q has hot-plugged devices (disks of attach_disk or stage_in, a NIC), which do not move live yet: %w", id, errdefs.ErrFailedPrecondition)
	}
	v.migrating = true
	return v, nil
}

func (v *vm) endMigration() {
	v.mu.Lock()
	v.migrating = false
	v.mu.Unlock()
}

// outgoingMachine is a migrating machine's spec with its paths relative
// (what the destination gets) and the drives to mirror.
type outgoingMachine struct {
	spec    []byte
	mirrors []vmm.Mirror // sockets set by run
}

// outgoing prepares the machine's spec for the destination.
func (p *Plant) outgoing(v *vm, req *computev1.MigrateVMRequest) (*outgoingMachine, error) {
	spec := v.m.Spec()
	mo := &outgoingMachine{}
	rel := func(path string) (string, error) { return p.relative(v, path) }
	var err error
	if spec.Kernel, err = rel(spec.Kernel); err != nil {
		return nil, err
	}
	if spec.Initrd, err = rel(spec.Initrd); err != nil {
		return nil, err
	}
	spec.Disks = slices.Clone(spec.Disks)
	for i := range spec.Disks {
		d := &spec.Disks[i]
		if d.Path, err = rel(d.Path); err != nil {
			return nil, err
		}
		if !strings.HasPrefix(d.Path, rootVM) {
			continue // the image server's: the destination reads it too
		}
		if i != 0 || d.Format != vmm.QCOW2 || d.ReadOnly {
			return nil, fmt.Errorf("vm %q has a local disk %s besides its redo log, which does not move live yet: %w", v.ad.VmId, d.Path, errdefs.ErrFailedPrecondition)
		}
		mo.mirrors = append(mo.mirrors, vmm.Mirror{Drive: vmm.DriveID(i), Full: req.CopyDisk})
	}
	// Made anew on the destination: the directory, sockets, RAM, taps.
	spec.Dir, spec.Channels, spec.Incoming = "", slices.Clone(spec.Channels), nil
	for i := range spec.Channels {
		spec.Channels[i].Socket = ""
	}
	if spec.MemoryFile != nil {
		spec.MemoryFile = &vmm.MemoryFile{Memfd: true}
	}
	spec.NICs = slices.Clone(spec.NICs)
	for i := range spec.NICs {
		spec.NICs[i].Tap = nil
	}
	if mo.spec, err = json.Marshal(spec); err != nil {
		return nil, err
	}
	return mo, nil
}

// relative is path relative to one of the plant's roots ("" stays "").
func (p *Plant) relative(v *vm, path string) (string, error) {
	if path == "" {
		return "", nil
	}
	roots := []struct{ prefix, dir string }{{rootVM, v.dir}, {rootView, p.cfg.Mountpoint}, {rootMem, p.memoryMountpoint()}}
	for _, r := range roots {
		if rel, err := filepath.Rel(r.dir, path); err == nil && filepath.IsLocal(rel) {
			return r.prefix + rel, nil
		}
	}
	return "", fmt.Errorf("vm %q uses %s, which is neither its own nor the image server's: %w", v.ad.VmId, path, errdefs.ErrFailedPrecondition)
}

// resolve is the inverse of relative on the destination: a path under
// one of its roots, never outside them.
func (p *Plant) resolve(dir, rel string) (string, error) {
	if rel == "" {
		return "", nil
	}
	for _, r := range []struct{ prefix, dir string }{{rootVM, dir}, {rootView, p.cfg.Mountpoint}, {rootMem, p.memoryMountpoint()}} {
		if s, ok := strings.CutPrefix(rel, r.prefix); ok {
			if !filepath.IsLocal(s) {
				return "", fmt.Errorf("machine path %q leaves its root: %w", rel, errdefs.ErrInvalidArgument)
			}
			return filepath.Join(r.dir, s), nil
		}
	}
	return "", fmt.Errorf("machine path %q: want %s, %s or %s: %w", rel, rootVM, rootView, rootMem, errdefs.ErrInvalidArgument)
}

func (p *Plant) memoryMountpoint() string {
	if p.cfg.MemoryMountpoint != "" {
		return p.cfg.MemoryMountpoint
	}
	return p.cfg.Mountpoint
}

// outgoing is one migration from this plant.
type outgoing struct {
	p        *Plant
	v        *vm
	req      *computev1.MigrateVMRequest
	mo       *outgoingMachine
	cc       grpc.ClientConnInterface
	start    time.Time
	progress MigrateProgress
	log      *zap.Logger

	ctl      computev1.PlantService_MigrateInClient
	ticket   string
	moved    atomic.Int64  // bytes through the tunnels, both ways
	switched time.Time     // the destination runs the guest
	resumed  time.Duration // from the order to run to the guest running
	answered time.Duration // from the guest running there to the answer here
	ad       *computev1.ClassAd
}

// run drives the destination through MigrateIn and QEMU through the
// migration.
func (o *outgoing) run(ctx context.Context) (*computev1.ClassAd, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the control stream: a destination not yet running cleans up
	o.progress("preparing", "preparing the machine on "+o.req.Destination.Plant, nil)
	vxlan, err := o.prepare(ctx)
	if err != nil {
		return nil, err
	}
	tunnels, err := o.openTunnels(ctx)
	if err != nil {
		return nil, err
	}
	defer tunnels.close()
	if err := o.waitFlooding(ctx, vxlan); err != nil {
		return nil, err
	}
	if len(o.mo.mirrors) > 0 {
		o.progress("mirroring", "mirroring the redo log", nil)
	}
	mig, err := vmm.Migrate(ctx, o.v.m, vmm.MigrateOptions{
		URI: "unix:" + tunnels.migration, Mirrors: o.mo.mirrors, PostCopy: o.req.PostCopy, Logger: o.log,
		Switchover: o.plug, Switched: o.runThere,
		Progress: func(info vmm.MigrationInfo) {
			if info.Status == "pre-switchover" || info.Status == "device" {
				o.progress("switching", "the guest is paused; switching over", o.stats(vmm.Migration{Info: info}))
				return
			}
			o.progress("copying", fmt.Sprintf("RAM %s", info.Status), o.stats(vmm.Migration{Info: info}))
		},
	})
	if err != nil {
		return nil, o.failed(err)
	}
	stats := o.stats(mig)
	o.release()
	o.ad.LastMigration = stats
	o.log.Info("VM migrated", zap.Duration("took", time.Since(o.start)), zap.Duration("downtime", time.Duration(stats.DowntimeNanos)),
		zap.Int64("qemu_downtime_ms", stats.QemuDowntimeMs), zap.Uint64("ram_bytes", stats.RamBytes), zap.Uint64("disk_bytes", stats.DiskBytes),
		zap.Uint64("moved_bytes", stats.MovedBytes))
	if sw := mig.Switch; !sw.Seen.IsZero() && !o.switched.IsZero() {
		o.log.Info("switch-over (from the pause seen)", zap.Duration("mirrors_finished", sw.Mirrors), zap.Duration("plugged", sw.Switchover),
			zap.Duration("state_sent", sw.Completed), zap.Duration("running_there", o.switched.Sub(sw.Seen)),
			zap.Duration("answered", o.switched.Add(o.answered).Sub(sw.Seen)))
	}
	o.progress("running", "running on "+o.req.Destination.Plant, stats)
	return o.ad, nil
}

// prepare opens the control stream and has the destination make the
// machine; it returns the destination's VXLAN endpoint.
func (o *outgoing) prepare(ctx context.Context) (string, error) {
	var err error
	if o.ctl, err = computev1.NewPlantServiceClient(o.cc).MigrateIn(ctx); err != nil {
		return "", unavailable("plant "+o.req.Destination.Plant, err)
	}
	ad := o.v.classad()
	if ad.Network != nil {
		if o.req.Network == nil || o.req.Network.Mac != ad.Network.Mac || o.req.Network.Address != ad.Network.Address || o.req.Network.Vni != ad.Network.Vni {
			return "", fmt.Errorf("vm %q keeps its lease when it moves: the request's network must carry it: %w", ad.VmId, errdefs.ErrInvalidArgument)
		}
		ad.Network = o.req.Network
	}
	err = o.ctl.Send(&computev1.MigrateInRequest{Step: computev1.MigrateStep_MIGRATE_STEP_PREPARE, Classad: ad,
		Machine: o.mo.spec, PostCopy: o.req.PostCopy, Source: o.p.cfg.Name})
	if err != nil {
		return "", unavailable("plant "+o.req.Destination.Plant, err)
	}
	resp, err := o.ctl.Recv()
	if err != nil {
		return "", o.destinationErr("prepare", err)
	}
	o.ticket = resp.Ticket
	return resp.VxlanEndpoint, nil
}

// destinationErr names the destination in its error; a failure of the
// stream itself (the plant died, the link broke) is Unavailable.
func (o *outgoing) destinationErr(step string, err error) error {
	if brokenStream(err) {
		return unavailable("plant "+o.req.Destination.Plant+" "+step, err)
	}
	return fmt.Errorf("plant %s: %s: %w", o.req.Destination.Plant, step, err)
}

// brokenStream reports an error of the stream rather than an answer of
// the destination's.
func brokenStream(err error) bool {
	switch errdefs.Code(err) {
	case codes.Unavailable, codes.Unknown, codes.Canceled:
		return true
	}
	return errors.Is(err, io.EOF)
}

// unavailable is err as Unavailable (its text kept, not a code it may
// carry from the destination: the VM runs on here, a retry may succeed).
func unavailable(what string, err error) error {
	return fmt.Errorf("%s: %s: %w", what, status.Convert(err).Message(), errdefs.ErrUnavailable)
}

// waitFlooding waits until this plant's segment of the VM's domain floods
// to the destination's (the registry shows the destination's new segment
// within its refresh): frames for the VM then reach it after the switch.
func (o *outgoing) waitFlooding(ctx context.Context, endpoint string) error {
	n := o.v.ad.GetNetwork()
	if n == nil || o.p.cfg.Network == nil || endpoint == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, peerWait)
	defer cancel()
	for !slices.Contains(o.p.cfg.Network.Peers(n.Vni), endpoint) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("plant %s's segment of domain %q did not show in the registry within %v: %w", o.req.Destination.Plant, n.Domain, peerWait, errdefs.ErrUnavailable)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// plug runs when the switch-over is near (or in the pause before it):
// the destination's tap joins its segment.
func (o *outgoing) plug(ctx context.Context) error {
	return o.step(computev1.MigrateStep_MIGRATE_STEP_PLUG)
}

func (o *outgoing) step(s computev1.MigrateStep) error {
	if err := o.ctl.Send(&computev1.MigrateInRequest{Step: s}); err != nil {
		return o.destinationErr(s.String(), err)
	}
	resp, err := o.ctl.Recv()
	if err != nil {
		return o.destinationErr(s.String(), err)
	}
	if resp.Step != s {
		return fmt.Errorf("plant %s answered %s to %s: %w", o.req.Destination.Plant, resp.Step, s, errdefs.ErrUnavailable)
	}
	if s == computev1.MigrateStep_MIGRATE_STEP_RUN {
		o.ad, o.resumed = resp.Classad, time.Duration(resp.ResumedNanos)
	}
	return nil
}

// runThere has the destination run the guest once it has the state. An
// error means the destination does not run it: the source then does. A
// stream that broke after the order went may have lost only the answer,
// so the destination is asked; one that cannot be reached is dead, and
// its machines with it (they die with their plant).
func (o *outgoing) runThere(ctx context.Context) error {
	t0 := time.Now()
	err := o.step(computev1.MigrateStep_MIGRATE_STEP_RUN)
	if err == nil {
		o.switched = t0.Add(o.resumed)
		o.answered = time.Since(o.switched)
	}
	if err == nil || !brokenStream(err) {
		return err
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	ad, gerr := computev1.NewPlantServiceClient(o.cc).GetVM(cctx, &computev1.GetVMRequest{VmId: o.v.ad.VmId})
	if gerr == nil && ad.State == computev1.VMState_VM_STATE_RUNNING {
		o.log.Warn("the destination's answer was lost, but it runs the VM", zap.Error(err))
		o.ad, o.switched = ad, time.Now()
		return nil
	}
	return err
}

// failed is a failed migration's error, with the destination's side
// ended (the deferred cancel ends the control stream: the destination
// removes the machine it made).
func (o *outgoing) failed(err error) error {
	var me *vmm.MachineError
	if errors.As(err, &me) || errdefs.Code(err) == codes.Unknown {
		return unavailable(fmt.Sprintf("migrate vm %s to %s", o.v.ad.VmId, o.req.Destination.Plant), err)
	}
	return err
}

// stats turns QEMU's figures and the tunnels' count into the proto's.
func (o *outgoing) stats(mig vmm.Migration) *computev1.MigrationStats {
	s := &computev1.MigrationStats{
		TotalNanos: int64(time.Since(o.start)), QemuDowntimeMs: mig.Info.Downtime, MovedBytes: uint64(o.moved.Load()),
		PostCopy: mig.PostCopy, CpuThrottlePercent: mig.Info.CPUThrottle,
	}
	if r := mig.Info.RAM; r != nil {
		s.RamBytes, s.RamTotalBytes, s.ZeroPages, s.DirtySyncCount = uint64(r.Transferred), uint64(r.Total), uint64(r.Duplicate), r.DirtySyncCount
	}
	for _, m := range mig.Mirrors {
		s.DiskBytes += uint64(m.Bytes)
	}
	if paused := mig.Switch.Seen; !o.switched.IsZero() && !paused.IsZero() {
		s.DowntimeNanos = int64(o.switched.Sub(paused))
		if mig.PostCopy {
			s.SourceReleasedNanos = int64(time.Since(o.switched))
		}
	}
	return s
}

// release lets the VM go from this plant once it runs on the destination:
// its machine (paused for good), agent, streams, tap and directory.
func (o *outgoing) release() {
	o.p.forget(o.v)
	if o.ad == nil {
		o.ad = proto.Clone(o.v.ad).(*computev1.ClassAd)
	}
}

// forget removes a VM from the plant and tears it down (its machine,
// agent, streams, tap, directory).
func (p *Plant) forget(v *vm) {
	p.mu.Lock()
	if p.vms[v.ad.VmId] == v {
		delete(p.vms, v.ad.VmId)
	}
	p.mu.Unlock()
	p.teardown(v)
}
