package plant

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/computeserver/vnet"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Config configures a Plant.
type Config struct {
	// Name of the plant in classads.
	Name string
	// Dir holds one directory per VM (keep it short: unix sockets live
	// there).
	Dir string
	// Mountpoint of the FUSE view of Proxy.
	Mountpoint string
	// MemoryMountpoint is a second view of Proxy with a small read-ahead,
	// from which lazy clones map RAM files (empty: Mountpoint).
	MemoryMountpoint string
	Proxy            *gvfs.Proxy
	Driver           vmm.Driver
	// MemoryMiB is what the plant may give to guests in all; 0 means
	// DefaultMemoryMiB. Plants sharing a host divide it between them.
	MemoryMiB uint64
	// DiskMiB caps the disks host actions (attach_disk, stage_in) of all
	// its VMs may take, beyond the free space of Dir; 0: no cap.
	DiskMiB uint64
	// DataServer is the data server stage-in and stage-out use: grid
	// configuration, never a request's choice, since the plant presents
	// the owners' task credentials there. Empty: the plant stages nothing.
	// DataTLS secures those connections.
	DataServer string
	DataTLS    services.TLSFiles
	// StageOutTimeout bounds one stage-out (0: DefaultStageOutTimeout).
	StageOutTimeout time.Duration
	// AgentTimeout bounds the wait for a clone's guest agent (0:
	// DefaultAgentTimeout); a guest that never answers fails its creation
	// then, with its console's last lines.
	AgentTimeout time.Duration
	// GuestTimeout bounds the cold boot of a stock image until its guest
	// is configured (qemu-ga answers, cloud-init is done); 0:
	// DefaultGuestTimeout.
	GuestTimeout time.Duration
	// MemoryRestore is how clones of images with a RAM file get the
	// guest's memory: lazy, eager or auto (lazymem.go; empty: auto).
	MemoryRestore MemoryRestore
	// HydrateAfter is how long after a lazy clone is ready its hydration
	// starts (0: DefaultHydrateAfter; negative: at once).
	HydrateAfter time.Duration
	Logger       *zap.Logger
	// Network makes the guests' segments (network.go); nil: VMs with a
	// network are refused.
	Network *vnet.Manager
	// DialPlant connects to another plant's services as this plant (its
	// service token), for live migration (migrate.go); nil: VMs do not
	// migrate from here.
	DialPlant func(addr string) (*grpc.ClientConn, error)
}

// DefaultStageOutTimeout bounds a stage-out whose caller set no deadline
// shorter: a guest can leave a million files.
const DefaultStageOutTimeout = 30 * time.Minute

// DefaultConfig is a plant's configuration before the caller sets paths,
// proxy and driver.
func DefaultConfig() Config {
	return Config{MemoryMiB: DefaultMemoryMiB(), StageOutTimeout: DefaultStageOutTimeout}
}

// DefaultMemoryMiB is what one plant alone on its host gives guests: 80% of
// the host's RAM, the rest for the plant, its caches and QEMU's overhead.
func DefaultMemoryMiB() uint64 { return hostMemoryMiB() * 8 / 10 }

// hostMemoryMiB is the machine's RAM.
func hostMemoryMiB() uint64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 1024
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), "MemTotal:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb / 1024
		}
	}
	return 1024
}

// Plant runs VMs.
type Plant struct {
	cfg Config
	log *zap.Logger

	mu     sync.Mutex
	vms    map[string]*vm
	images map[string]uint64 // bytes fetched for clones of each image
	// draining: the plant is leaving and takes no new VMs (drain.go).
	draining bool

	// closing is closed when Close starts; bg counts the goroutines that
	// outlive a creation (profile recordings), which Close waits for.
	closing   chan struct{}
	closeOnce sync.Once
	bg        sync.WaitGroup
}

type vm struct {
	mu      sync.Mutex
	ad      *computev1.ClassAd
	m       vmm.Machine
	agent   guestAgent // vmgrid's agent or qemu-ga
	dir     string
	ready   chan struct{} // closed when creation ended
	err     error         // creation error
	rootRW  string        // FUSE path of a persistent root disk
	created time.Time
	// resumeKernel: the machine was restored with the image's resume
	// kernel (VMConfig.ResumeKernel), not its boot kernel.
	resumeKernel bool

	diskMiB uint64 // what its host actions take on the plant's disk

	dataDisk, dataMount string // stage-in data disk (host path), its guest mount
	// dataCred is the task credential CreateVM brought, for stage-in and a
	// StageOut that brings none. Memory only: never in classad.json or logs.
	dataCred string

	access accessSet // open exec, console and port-forward streams (access.go)
	// mem is a lazily restored guest's RAM (lazymem.go); nil otherwise.
	mem *lazyMem

	// performed is every configuration action the machine has performed,
	// its image's first; hostActions: some were host actions (publish.go).
	performed   []*imagev1.Action
	hostActions bool
	// suspending is a suspend whose machine is saved but not yet written
	// back and published (suspend.go); a retry goes on from it.
	suspending *suspension
	// busy serializes the verbs that save the machine (SuspendVM,
	// PublishVM), which take seconds: v.mu is held only to read and set
	// fields, so GetVM and the hydration's progress never wait for them.
	busy sync.Mutex
	// Live migration (migrate.go): the VM is moving away; it is moving
	// in (the ticket its tunnels present); devices hot-plugged since its
	// machine started (they do not move yet).
	migrating  bool
	incoming   *incoming
	hotplugged int
}

// New opens a plant. VMs left running by a previous process are stopped
// and their directories removed: a plant never leaks a process or a file.
func New(cfg Config) (*Plant, error) {
	cfg.Logger = services.LoggerOr(cfg.Logger)
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = DefaultMemoryMiB()
	}
	if cfg.StageOutTimeout == 0 {
		cfg.StageOutTimeout = DefaultStageOutTimeout
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, err
	}
	p := &Plant{cfg: cfg, log: cfg.Logger, vms: map[string]*vm{}, images: map[string]uint64{}, closing: make(chan struct{})}
	p.reap()
	if err := p.reconcileNetwork(); err != nil {
		return nil, err
	}
	return p, nil
}

// Progress receives CreateVM's progress.
type Progress func(state computev1.VMState, msg string)

func newID() string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	return "vm-" + hex.EncodeToString(b[:])
}

func (p *Plant) lookup(id string) (*vm, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	v := p.vms[id]
	if v == nil {
		return nil, fmt.Errorf("vm %q is not on plant %s: %w", id, p.cfg.Name, errdefs.ErrNotFound)
	}
	return v, nil
}

// claim registers a new VM id, or returns the existing VM of that id (a
// retried request).
func (p *Plant) claim(id string, ad *computev1.ClassAd, diskMiB uint64) (*vm, bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if v := p.vms[id]; v != nil {
		return v, false, nil
	}
	if p.draining {
		return nil, false, fmt.Errorf("plant %s is draining (leaving the grid) and takes no new VMs; place the VM on another plant: %w", p.cfg.Name, errdefs.ErrUnavailable)
	}
	var used uint64
	for _, v := range p.vms {
		used += v.ad.GetHardware().GetMemoryMib()
	}
	if need := ad.Hardware.MemoryMib; used+need > p.cfg.MemoryMiB {
		return nil, false, fmt.Errorf("plant %s has %d MiB of guest memory left, the VM needs %d MiB: %w", p.cfg.Name, p.cfg.MemoryMiB-min(used, p.cfg.MemoryMiB), need, errdefs.ErrResourceExhausted)
	}
	if err := p.diskRoomLocked(diskMiB); err != nil {
		return nil, false, err
	}
	v := &vm{ad: ad, dir: filepath.Join(p.cfg.Dir, id), ready: make(chan struct{}), created: time.Now(), diskMiB: diskMiB}
	p.vms[id] = v
	return v, true, nil
}

// wait returns the classad of a VM whose creation another call started.
func (v *vm) wait(ctx context.Context) (*computev1.ClassAd, error) {
	select {
	case <-v.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if v.err != nil {
		return nil, v.err
	}
	return v.classad(), nil
}

func (v *vm) classad() *computev1.ClassAd {
	v.mu.Lock()
	defer v.mu.Unlock()
	return proto.Clone(v.ad).(*computev1.ClassAd)
}

// prefetch streams files QEMU reads whole, in the order it reads them (the
// kernel when it starts, then the memory state), one after the other:
// without it a cold plant's link idles while the redo log is made and QEMU
// starts, and again between the two files (0.14 s of a 5.7 s cold clone
// over a 40 ms, 100 Mbit/s WAN, vmgrid bench clone).
// One at a time, as QEMU needs the whole kernel before it reads the memory
// state. A hint: QEMU's own reads report errors.
func (p *Plant) prefetch(ctx context.Context, image string, files ...string) {
	var whole []gvfs.File
	for _, name := range files {
		if name == "" {
			continue
		}
		if f, err := p.cfg.Proxy.Open(ctx, image, name); err == nil && f.Meta().Policy == imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE && f.Size() > 0 {
			whole = append(whole, f)
		}
	}
	if len(whole) == 0 {
		return
	}
	// Bound by ctx: once the VM is made, QEMU has read them.
	go func() {
		var b [1]byte
		for _, f := range whole {
			// The last byte: wait until the whole file is here.
			if _, err := f.ReadAt(ctx, b[:], int64(f.Size())-1); err != nil {
				return
			}
		}
	}()
}

func (p *Plant) fetched() uint64 {
	s := p.cfg.Proxy.Stats()
	return s.FetchedBytes.Load() + p.cfg.Proxy.FileCache().Received()
}

func (v *vm) setState(s computev1.VMState) {
	v.mu.Lock()
	v.ad.State = s
	v.mu.Unlock()
}

func (p *Plant) persist(v *vm) {
	b, err := protojson.Marshal(v.classad())
	if err == nil {
		err = os.WriteFile(filepath.Join(v.dir, "classad.json"), b, 0o644)
	}
	if err != nil {
		p.log.Warn("could not save the classad", zap.String("vm", v.ad.VmId), zap.Error(err))
	}
}

// teardown stops a VM's machine and removes its files.
func (p *Plant) teardown(v *vm) {
	v.access.close()
	v.mem.stop()
	if v.agent != nil {
		v.agent.Close()
	}
	p.stopMachine(v)
	p.detachNetwork(v)
	if err := os.RemoveAll(v.dir); err != nil {
		p.log.Warn("remove VM directory", zap.String("dir", v.dir), zap.Error(err))
	}
}

// stopMachine stops a VM's machine, if it has one.
func (p *Plant) stopMachine(v *vm) {
	if v.m == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := v.m.Stop(ctx); err != nil {
		p.log.Warn("stop", zap.String("vm", v.ad.VmId), zap.Error(err))
	}
}

// GetVM returns a VM's classad.
func (p *Plant) GetVM(id string) (*computev1.ClassAd, error) {
	v, err := p.lookup(id)
	if err != nil {
		return nil, err
	}
	return v.classad(), nil
}

// ListVMs returns the classads of the VMs on this plant (of one owner if
// owner is set), by id.
func (p *Plant) ListVMs(owner string) []*computev1.ClassAd {
	p.mu.Lock()
	vs := make([]*vm, 0, len(p.vms))
	for _, v := range p.vms {
		vs = append(vs, v)
	}
	p.mu.Unlock()
	var out []*computev1.ClassAd
	for _, v := range vs {
		ad := v.classad()
		if owner == "" || ad.Owner == owner {
			out = append(out, ad)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VmId < out[j].VmId })
	return out
}

// Offer is what the plant offers now, for bids.
type Offer struct {
	Name               string
	MemoryMiB, FreeMiB uint64
	Running            int
	Domains            []string          // network domains of running VMs
	Images             map[string]uint64 // bytes held of each image
	Draining           bool              // leaving: no new VMs (drain.go)
}

// Offer reports the plant's load and what its caches hold.
func (p *Plant) Offer() Offer {
	p.mu.Lock()
	defer p.mu.Unlock()
	o := Offer{Name: p.cfg.Name, MemoryMiB: p.cfg.MemoryMiB, Running: len(p.vms), Images: map[string]uint64{}, Draining: p.draining}
	var used uint64
	seen := map[string]bool{}
	for _, v := range p.vms {
		used += v.ad.GetHardware().GetMemoryMib()
		if d := v.ad.GetLabels()["domain"]; d != "" && !seen[d] {
			seen[d] = true
			o.Domains = append(o.Domains, d)
		}
	}
	o.FreeMiB = p.cfg.MemoryMiB - min(used, p.cfg.MemoryMiB)
	for k, b := range p.images {
		o.Images[k] = b
	}
	sort.Strings(o.Domains)
	return o
}

// DestroyVM stops a VM and releases everything it had; a persistent VM's
// disk changes are written back first.
func (p *Plant) DestroyVM(ctx context.Context, id string) error {
	v, err := p.lookup(id)
	if err != nil {
		return err
	}
	select {
	case <-v.ready:
	case <-ctx.Done():
		return ctx.Err()
	}
	p.mu.Lock()
	if p.vms[id] != v {
		p.mu.Unlock()
		return fmt.Errorf("vm %q: %w", id, errdefs.ErrNotFound)
	}
	delete(p.vms, id)
	p.mu.Unlock()
	p.teardown(v)
	if v.ad.PersistentDisk != "" {
		if _, err := p.cfg.Proxy.Flush(ctx, v.ad.PersistentDisk); err != nil {
			return fmt.Errorf("vm %s destroyed, but writing back disk %s failed (its blocks stay dirty in the cache and are retried): %w", id, v.ad.PersistentDisk, err)
		}
	}
	p.log.Info("VM destroyed", zap.String("vm", id))
	return nil
}

// Exec runs a command in a VM through its agent.
func (p *Plant) Exec(ctx context.Context, id string, e *computev1.ExecAction) (*computev1.ExecVMResponse, error) {
	v, err := p.readyAgent(ctx, id)
	if err != nil {
		return nil, err
	}
	resp, err := v.agent.Do(ctx, execRequest(e))
	if err != nil {
		return nil, fmt.Errorf("agent of %s: %w: %w", id, err, errdefs.ErrUnavailable)
	}
	return &computev1.ExecVMResponse{ExitCode: int32(resp.ExitCode), Stdout: resp.Stdout, Stderr: resp.Stderr, Results: resp.Results, Error: resp.Error}, nil
}

// Close stops every VM (persistent disks are written back) and abandons
// the profile recordings still running.
func (p *Plant) Close(ctx context.Context) {
	p.closeOnce.Do(func() { close(p.closing) })
	defer p.bg.Wait()
	p.mu.Lock()
	ids := make([]string, 0, len(p.vms))
	for id := range p.vms {
		ids = append(ids, id)
	}
	p.mu.Unlock()
	for _, id := range ids {
		if err := p.DestroyVM(ctx, id); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			p.log.Warn("destroy at shutdown", zap.String("vm", id), zap.Error(err))
		}
	}
}
