package plant

import (
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/shop/dag"
)

// GoldenHook is the guest hook of golden images built here: make the root
// writable (clones write into their redo log) and run the agent forever.
const GoldenHook = `#!/bin/sh
mount -o remount,rw /
echo "vmgrid-guest: agent starting"
exec /sbin/vmgrid-agent
`

// GoldenOptions configure BuildGolden.
type GoldenOptions struct {
	// Name of the image to publish.
	Name string
	// Recipe builds the files; its root file system must contain the agent
	// at /sbin/vmgrid-agent and start it (see GoldenHook).
	Recipe imagebuild.Recipe
	// WorkDir holds the build (a short path: it holds unix sockets).
	WorkDir string
	Driver  vmm.Driver
	// Publish uploads the result; nil only builds.
	Publish *imageclient.Client
	// Labels are added to the image's attributes.
	Labels map[string]string
	// Actions are configuration actions performed in the guest before it is
	// suspended; the image records them (with their digests) so requests
	// whose DAG starts with them match it and skip them (VMPlants §3.2).
	Actions []*computev1.Action
	Logger  *zap.Logger
	// AgentTimeout bounds the boot: the wait for the agent, then the
	// image's Ready command, each (0: DefaultGoldenTimeout).
	AgentTimeout time.Duration

	// From builds from an existing image on the image server (Publish)
	// instead of Recipe: an imported image without a memory state, booted
	// from firmware (golden_from.go). GuestTimeout bounds its cold boot
	// until its guest agent answers (0: DefaultGuestTimeout).
	From         string
	GuestTimeout time.Duration
}

// Golden is a built golden image on local disk.
type Golden struct {
	Dir    string
	Config VMConfig
	Attrs  *imagev1.ImageAttributes
	Files  []imageclient.PublishFile
	// Took is the time of each phase.
	Took map[string]time.Duration
}

// BuildGolden builds a golden image: the recipe's files, booted under QEMU
// on a redo log until the agent answers, configured, suspended to a memory
// state, and the redo log folded into the root disk so disk and memory are
// the same instant. Then it is published if opts.Publish is set.
func BuildGolden(ctx context.Context, opts GoldenOptions) (*Golden, error) {
	b := &goldenBuild{opts: opts, log: services.LoggerOr(opts.Logger), g: &Golden{Dir: opts.WorkDir, Took: map[string]time.Duration{}}}
	defer b.kill()
	for _, s := range []struct {
		name string
		do   func(*goldenBuild, context.Context) error
	}{
		{"files", (*goldenBuild).files},
		{"boot", (*goldenBuild).boot},
		{"ready", (*goldenBuild).ready},
		{"actions", (*goldenBuild).actions},
		{"suspend", (*goldenBuild).suspend},
		{"commit", (*goldenBuild).commit},
		{"describe", (*goldenBuild).describe},
		{"publish", (*goldenBuild).publish},
	} {
		start := time.Now()
		if err := s.do(b, ctx); err != nil {
			return nil, err
		}
		b.g.Took[s.name] = time.Since(start)
		b.log.Info("golden build", zap.String("phase", s.name), zap.Duration("took", b.g.Took[s.name]))
	}
	return b.g, nil
}

// goldenBuild is one golden image on its way through BuildGolden.
type goldenBuild struct {
	opts    GoldenOptions
	log     *zap.Logger
	g       *Golden
	img     *imagebuild.Image
	overlay string // the redo log the build boots on
	m       vmm.Machine
	ac      guestAgent
	// performed is what the image records of its actions.
	performed []*imagev1.Action
	mem, root string
	from      *fromSource // a From build's source (golden_from.go)
}

func (b *goldenBuild) kill() {
	if b.ac != nil {
		b.ac.Close()
	}
	if b.m != nil {
		_ = b.m.Kill() // a no-op once suspended
	}
}

func (b *goldenBuild) files(ctx context.Context) error {
	if b.opts.From != "" {
		return b.fromFiles(ctx)
	}
	img, err := b.opts.Recipe.Build(ctx, filepath.Join(b.opts.WorkDir, "files"))
	if err != nil {
		return fmt.Errorf("recipe %s: %w", b.opts.Recipe.Name(), err)
	}
	b.img = img
	return nil
}

// boot starts the machine on a redo log, so the recipe's disk stays as
// built until the suspend (then the log is folded in), and waits for the
// agent.
func (b *goldenBuild) boot(ctx context.Context) error {
	if b.opts.From != "" {
		return b.fromBoot(ctx)
	}
	img := b.img
	b.overlay = filepath.Join(b.opts.WorkDir, "build.qcow2")
	if err := qemuImg(ctx, "create", "-q", "-f", "qcow2", "-b", img.RootDisk, "-F", "raw", b.overlay); err != nil {
		return err
	}
	spec := vmm.Spec{
		Name:      "golden-" + b.opts.Name,
		Dir:       filepath.Join(b.opts.WorkDir, "m"),
		VCPUs:     img.Attributes.VCPUs,
		MemoryMiB: img.Attributes.MemoryMiB,
		Kernel:    img.Kernel,
		Initrd:    img.Initrd,
		Append:    img.Cmdline,
		Disks:     []vmm.Disk{{Path: b.overlay, Format: vmm.QCOW2, Interface: vmm.DiskInterface(img.RootInterface)}},
		Channels:  []vmm.Channel{{Name: AgentChannel, Socket: filepath.Join(b.opts.WorkDir, "m", "agent.sock")}},
		NICs:      goldenNICs, // network.go: clones rewire it
		ExtraArgs: hotplugPorts,
		VMGenID:   vmm.NewGUID(), // clones get their own (identity.go)
		// RAM as a shared file: the suspend leaves it out of the memory
		// state, and it is published block by block (lazymem.go).
		MemoryFile: goldenRAM(b.opts.WorkDir),
	}
	m, err := b.opts.Driver.Start(ctx, spec)
	if err != nil {
		return err
	}
	b.m = m
	ac, err := waitAgent(ctx, m, spec.Channels[0].Socket, b.agentTimeout())
	if err != nil {
		return fmt.Errorf("golden boot: the agent never answered: %w", err)
	}
	b.ac = ac // not a nil *agent.Client in the interface: kill closes b.ac
	return nil
}

// actions performs the golden image's configuration in the guest, on the
// runner clones use, and empties its page cache.
func (b *goldenBuild) actions(ctx context.Context) error {
	if len(b.opts.Actions) > 0 {
		plan, err := dag.New(&computev1.ConfigDAG{Actions: b.opts.Actions})
		if err != nil {
			return fmt.Errorf("golden actions: %w", err)
		}
		for _, s := range plan.Steps {
			if dag.IsHost(s.Action) {
				return fmt.Errorf("golden action %q: host actions cannot be part of a golden image", s.Action.Id)
			}
			b.performed = append(b.performed, &imagev1.Action{Name: s.Action.Id, Kind: s.Kind, Digest: s.Digest})
		}
		r := &runner{agent: b.ac, m: b.m}
		if _, f := r.run(ctx, plan, nil); f != nil {
			return fmt.Errorf("golden %w", f)
		}
	}
	err := dropCaches(ctx, b.ac)
	b.ac.Close()
	b.ac = nil
	return err
}

func (b *goldenBuild) suspend(ctx context.Context) error {
	b.mem = filepath.Join(b.opts.WorkDir, MemoryFile)
	return b.m.Suspend(ctx, b.mem)
}

// commit folds the redo log into the root disk.
func (b *goldenBuild) commit(ctx context.Context) error {
	b.root = filepath.Join(b.opts.WorkDir, RootFile)
	if err := qemuImg(ctx, "convert", "-q", "-O", "raw", "-S", "4k", b.overlay, b.root); err != nil {
		return err
	}
	os.Remove(b.overlay)
	return nil
}

// describe writes vm.json and the resume kernel, and lists the image's
// attributes and files.
func (b *goldenBuild) describe(ctx context.Context) error {
	if b.opts.From != "" {
		return b.fromDescribe(ctx)
	}
	g, img, dir := b.g, b.img, b.opts.WorkDir
	used := b.m.Spec()
	tmpl := used
	tmpl.Name, tmpl.Dir, tmpl.Kernel, tmpl.Initrd, tmpl.Incoming = "", "", "", "", nil
	tmpl.MemoryFile = nil // vm.json's RAM says where it is
	tmpl.Disks = []vmm.Disk{{Format: vmm.QCOW2, Interface: used.Disks[0].Interface}}
	tmpl.Channels = []vmm.Channel{{Name: AgentChannel}}
	g.Config = VMConfig{Version: 1, Spec: tmpl, Kernel: KernelFile, Root: RootFile, Memory: MemoryFile}
	if used.MemoryFile != nil {
		g.Config.RAM = RAMFile
	}
	if img.Initrd != "" {
		g.Config.Initrd = InitrdFile
	}
	resumeKernel := filepath.Join(dir, ResumeKernelFile)
	if err := WriteResumeKernel(img.Kernel, resumeKernel); err != nil {
		b.log.Warn("no resume kernel: clones will fetch the whole kernel", zap.Error(err))
	} else {
		g.Config.ResumeKernel = ResumeKernelFile
	}
	cfgPath := filepath.Join(dir, ConfigFile)
	if err := writeJSON(cfgPath, g.Config); err != nil {
		return err
	}
	g.Attrs = &imagev1.ImageAttributes{
		Actions: b.performed,
		Arch:    img.Attributes.Arch, Vcpus: uint32(used.VCPUs), MemoryMib: uint64(used.MemoryMiB), Os: img.Attributes.OS,
		Labels: map[string]string{"recipe": b.opts.Recipe.Name(), "kernel": img.KernelRelease},
	}
	maps.Copy(g.Attrs.Labels, b.opts.Labels)
	g.Files = []imageclient.PublishFile{
		{Name: ConfigFile, Path: cfgPath, Kind: imagev1.FileKind_FILE_KIND_CONFIG},
		{Name: KernelFile, Path: img.Kernel, Kind: imagev1.FileKind_FILE_KIND_KERNEL},
		{Name: RootFile, Path: b.root, Kind: imagev1.FileKind_FILE_KIND_DISK},
		{Name: MemoryFile, Path: b.mem, Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE},
	}
	if used.MemoryFile != nil {
		g.Files = append(g.Files, ramPublishFile(used.MemoryFile.Path))
	}
	if img.Initrd != "" {
		g.Files = append(g.Files, imageclient.PublishFile{Name: InitrdFile, Path: img.Initrd, Kind: imagev1.FileKind_FILE_KIND_INITRD})
	}
	if g.Config.ResumeKernel != "" {
		g.Files = append(g.Files, imageclient.PublishFile{Name: ResumeKernelFile, Path: resumeKernel, Kind: imagev1.FileKind_FILE_KIND_KERNEL})
	}
	return nil
}

func (b *goldenBuild) publish(ctx context.Context) error {
	if b.opts.Publish == nil {
		return nil
	}
	if _, err := b.opts.Publish.Publish(ctx, imageclient.PublishSpec{Name: b.opts.Name, Attributes: b.g.Attrs, Files: b.g.Files}, nil); err != nil {
		return fmt.Errorf("publish %s: %w", b.opts.Name, err)
	}
	return nil
}

// dropCaches empties the guest's page cache before the suspend: its pages
// would be in the memory state every clone fetches, and a clone reads again
// only the few files it touches. (The kernel zeroes the freed pages when
// booted with init_on_free=1, as the tiny recipe is, so they cost nothing.)
func dropCaches(ctx context.Context, ac guestAgent) error {
	r, err := ac.Do(ctx, agent.Request{Op: agent.OpExec, Argv: []string{"/bin/sh", "-c", "sync && echo 3 > /proc/sys/vm/drop_caches"}})
	if err != nil {
		return fmt.Errorf("drop the guest's caches before the suspend: %w", err)
	}
	if r.Error != "" || r.ExitCode != 0 {
		return fmt.Errorf("drop the guest's caches before the suspend: exit %d %s%s", r.ExitCode, r.Error, r.Stderr)
	}
	return nil
}

func qemuImg(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "qemu-img", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img %s: %w: %s", args[0], err, out)
	}
	return nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}
