package plant

import (
	"context"
	"encoding/json"
	"fmt"
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
	"github.com/vmgrid/vmgrid/services/dag"
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
	Log     *zap.Logger
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
// on a redo log until the agent answers, suspended to a memory state, and
// the redo log folded into the root disk so disk and memory are the same
// instant. Then it is published if opts.Publish is set.
func BuildGolden(ctx context.Context, opts GoldenOptions) (*Golden, error) {
	log := opts.Log
	if log == nil {
		log = zap.NewNop()
	}
	g := &Golden{Dir: opts.WorkDir, Took: map[string]time.Duration{}}
	phase := func(name string, start time.Time) {
		g.Took[name] = time.Since(start)
		log.Info("golden build", zap.String("phase", name), zap.Duration("took", g.Took[name]))
	}
	start := time.Now()
	img, err := opts.Recipe.Build(ctx, filepath.Join(opts.WorkDir, "files"))
	if err != nil {
		return nil, fmt.Errorf("recipe %s: %w", opts.Recipe.Name(), err)
	}
	phase("files", start)

	// Boot on a redo log so the recipe's disk stays as built until the
	// suspend, then fold it in.
	start = time.Now()
	overlay := filepath.Join(opts.WorkDir, "build.qcow2")
	if err := qemuImg(ctx, "create", "-q", "-f", "qcow2", "-b", img.RootDisk, "-F", "raw", overlay); err != nil {
		return nil, err
	}
	spec := vmm.Spec{
		Name:      "golden-" + opts.Name,
		Dir:       filepath.Join(opts.WorkDir, "m"),
		VCPUs:     img.Attributes.VCPUs,
		MemoryMiB: img.Attributes.MemoryMiB,
		Kernel:    img.Kernel,
		Initrd:    img.Initrd,
		Append:    img.Cmdline,
		Disks:     []vmm.Disk{{Path: overlay, Format: vmm.QCOW2, Interface: vmm.DiskInterface(img.RootInterface)}},
		Channels:  []vmm.Channel{{Name: AgentChannel, Socket: filepath.Join(opts.WorkDir, "m", "agent.sock")}},
		ExtraArgs: hotplugPorts,
	}
	m, err := opts.Driver.Start(ctx, spec)
	if err != nil {
		return nil, err
	}
	defer m.Kill() //nolint:errcheck // no-op once suspended
	actx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	ac, err := agent.Dial(actx, spec.Channels[0].Socket)
	if err != nil {
		return nil, err
	}
	err = ac.WaitReady(actx)
	if err != nil {
		ac.Close()
		return nil, fmt.Errorf("golden boot: the agent never answered: %w\n%s", err, tail(m.ConsoleLog(), 2000))
	}
	phase("boot", start)
	performed, err := performActions(ctx, ac, opts.Actions)
	if err == nil {
		err = dropCaches(ctx, ac)
	}
	ac.Close()
	if err != nil {
		return nil, err
	}

	start = time.Now()
	mem := filepath.Join(opts.WorkDir, MemoryFile)
	if err := m.Suspend(ctx, mem); err != nil {
		return nil, err
	}
	phase("suspend", start)
	start = time.Now()
	root := filepath.Join(opts.WorkDir, RootFile)
	if err := qemuImg(ctx, "convert", "-q", "-O", "raw", "-S", "4k", overlay, root); err != nil {
		return nil, err
	}
	os.Remove(overlay)
	phase("commit", start)

	used := m.Spec()
	tmpl := used
	tmpl.Name, tmpl.Dir, tmpl.Kernel, tmpl.Initrd, tmpl.Incoming = "", "", "", "", nil
	tmpl.Disks = []vmm.Disk{{Format: vmm.QCOW2, Interface: used.Disks[0].Interface}}
	tmpl.Channels = []vmm.Channel{{Name: AgentChannel}}
	g.Config = VMConfig{Version: 1, Spec: tmpl, Kernel: KernelFile, Root: RootFile, Memory: MemoryFile}
	if img.Initrd != "" {
		g.Config.Initrd = InitrdFile
	}
	resumeKernel := filepath.Join(opts.WorkDir, ResumeKernelFile)
	if err := WriteResumeKernel(img.Kernel, resumeKernel); err != nil {
		log.Warn("no resume kernel: clones will fetch the whole kernel", zap.Error(err))
	} else {
		g.Config.ResumeKernel = ResumeKernelFile
	}
	cfgPath := filepath.Join(opts.WorkDir, ConfigFile)
	b, _ := json.MarshalIndent(g.Config, "", "  ")
	if err := os.WriteFile(cfgPath, b, 0o644); err != nil {
		return nil, err
	}
	g.Attrs = &imagev1.ImageAttributes{
		Actions: performed,
		Arch:    img.Attributes.Arch, Vcpus: uint32(used.VCPUs), MemoryMib: uint64(used.MemoryMiB), Os: img.Attributes.OS,
		Labels: map[string]string{"recipe": opts.Recipe.Name(), "kernel": img.KernelRelease},
	}
	for k, v := range opts.Labels {
		g.Attrs.Labels[k] = v
	}
	g.Files = []imageclient.PublishFile{
		{Name: ConfigFile, Path: cfgPath, Kind: imagev1.FileKind_FILE_KIND_CONFIG},
		{Name: KernelFile, Path: img.Kernel, Kind: imagev1.FileKind_FILE_KIND_KERNEL},
		{Name: RootFile, Path: root, Kind: imagev1.FileKind_FILE_KIND_DISK},
		{Name: MemoryFile, Path: mem, Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE},
	}
	if img.Initrd != "" {
		g.Files = append(g.Files, imageclient.PublishFile{Name: InitrdFile, Path: img.Initrd, Kind: imagev1.FileKind_FILE_KIND_INITRD})
	}
	if g.Config.ResumeKernel != "" {
		g.Files = append(g.Files, imageclient.PublishFile{Name: ResumeKernelFile, Path: resumeKernel, Kind: imagev1.FileKind_FILE_KIND_KERNEL})
	}
	if opts.Publish != nil {
		start = time.Now()
		if _, err := opts.Publish.Publish(ctx, imageclient.PublishSpec{Name: opts.Name, Attributes: g.Attrs, Files: g.Files}, nil); err != nil {
			return nil, fmt.Errorf("publish %s: %w", opts.Name, err)
		}
		phase("publish", start)
	}
	return g, nil
}

// dropCaches empties the guest's page cache before the suspend: its pages
// would be in the memory state every clone fetches, and a clone reads again
// only the few files it touches. (The kernel zeroes the freed pages when
// booted with init_on_free=1, as the tiny recipe is, so they cost nothing.)
func dropCaches(ctx context.Context, ac *agent.Client) error {
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
		return fmt.Errorf("qemu-img %s: %v: %s", args[0], err, out)
	}
	return nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// performActions runs a golden image's configuration in the guest, in
// topological order, and returns what the image records of it.
func performActions(ctx context.Context, ac *agent.Client, actions []*computev1.Action) ([]*imagev1.Action, error) {
	if len(actions) == 0 {
		return nil, nil
	}
	if err := dag.Validate(&computev1.ConfigDAG{Actions: actions}); err != nil {
		return nil, fmt.Errorf("golden actions: %w", err)
	}
	digests, _ := dag.Digests(actions)
	ordered, _ := dag.Order(actions)
	p := &Plant{log: zap.NewNop()}
	v := &vm{agent: ac}
	var out []*imagev1.Action
	for _, a := range ordered {
		if dag.IsHost(a) {
			return nil, fmt.Errorf("golden action %q: host actions cannot be part of a golden image", a.Id)
		}
		if r := p.runAction(ctx, v, a); r.Error != "" {
			return nil, fmt.Errorf("golden action %q failed: %s%s", a.Id, r.Error, outputTail(r))
		}
		out = append(out, &imagev1.Action{Name: a.Id, Kind: dag.Kind(a), Digest: digests[a.Id]})
	}
	return out, nil
}
