package plant

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// A golden image built from an existing image (GoldenOptions.From, vmgrid
// image build --from): typically an imported stock image without a memory
// state. Its root disk and vm.json are fetched, it boots cold as a clone
// would (firmware, its own kernel), the build waits for its guest agent and
// for the boot to settle, then the common phases run: actions, page cache
// dropped, suspend, commit, publish. The result has a memory state, so its
// clones restore instead of booting; a cloud-init image becomes a qemu-ga
// image, since a restored guest does not run cloud-init again.

// fromSource is the image a From build starts from.
type fromSource struct {
	manifest *imagev1.Manifest
	config   *VMConfig
	root     string // the fetched root disk
	kind     imagev1.GuestAgent
}

// fromFiles fetches the source image's configuration and root disk.
func (b *goldenBuild) fromFiles(ctx context.Context) error {
	cl, name := b.opts.Publish, b.opts.From
	if cl == nil {
		return fmt.Errorf("a golden image from %q needs the image server's client (Publish) to fetch it", name)
	}
	m, err := cl.API.GetImage(ctx, &imagev1.GetImageRequest{Name: name})
	if err != nil {
		return fmt.Errorf("image %q: %w", name, err)
	}
	dir := filepath.Join(b.opts.WorkDir, "files")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	cfgPath := filepath.Join(dir, ConfigFile)
	if _, err := cl.FetchToFile(ctx, name, ConfigFile, cfgPath, 3, nil); err != nil {
		return fmt.Errorf("image %q has no %s a plant can run: %w", name, ConfigFile, err)
	}
	raw, err := os.ReadFile(cfgPath)
	if err != nil {
		return err
	}
	cfg, err := decodeConfig(raw)
	if err != nil {
		return fmt.Errorf("image %q: %w", name, err)
	}
	if cfg.Memory != "" || cfg.Kernel != "" {
		return fmt.Errorf("image %q already has a memory state or boots a kernel of its own: build from an imported image (vmgrid image import)", name)
	}
	root := filepath.Join(dir, cfg.Root)
	if _, err := cl.FetchToFile(ctx, name, cfg.Root, root, 3, nil); err != nil {
		return fmt.Errorf("fetch %s of %q: %w", cfg.Root, name, err)
	}
	b.img = &imagebuild.Image{} // no Ready command: fromBoot settles the boot itself
	b.from = &fromSource{manifest: m.GetManifest(), config: cfg, root: root, kind: GuestKind(m.GetManifest().GetAttributes())}
	return nil
}

// fromBoot boots the fetched disk on a redo log from firmware and waits
// for its guest agent and for the boot to settle.
func (b *goldenBuild) fromBoot(ctx context.Context) error {
	src := b.from
	b.overlay = filepath.Join(b.opts.WorkDir, "build.qcow2")
	if err := qemuImg(ctx, "create", "-q", "-f", "qcow2", "-b", src.root, "-F", "raw", b.overlay); err != nil {
		return err
	}
	spec := src.config.Spec
	spec.Name, spec.Dir = "golden-"+b.opts.Name, filepath.Join(b.opts.WorkDir, "m")
	spec.Disks = []vmm.Disk{{Path: b.overlay, Format: vmm.QCOW2, Interface: spec.Disks[0].Interface}}
	spec.Channels = []vmm.Channel{{Name: agentPort(src.kind), Socket: filepath.Join(spec.Dir, "agent.sock")}}
	spec.VMGenID = vmm.NewGUID() // clones get their own (identity.go)
	m, err := b.opts.Driver.Start(ctx, spec)
	if err != nil {
		return err
	}
	b.m = m
	timeout := b.opts.GuestTimeout
	if timeout == 0 {
		timeout = DefaultGuestTimeout
	}
	// Assigned only on success: a nil pointer in b.ac would be closed.
	if src.kind == imagev1.GuestAgent_GUEST_AGENT_VMGRID {
		var ac *agent.Client
		if ac, err = waitAgent(ctx, m, spec.Channels[0].Socket, timeout); err == nil {
			b.ac = ac
		}
	} else {
		var qa *qgaAgent
		if qa, err = waitQGA(ctx, m, spec.Channels[0].Socket, timeout); err == nil {
			b.ac = qa
		}
	}
	if err != nil {
		return fmt.Errorf("golden boot of %q: its guest agent never answered (an image configured through cloud-init needs qemu-ga for a memory state: clones of it are configured through qemu-ga): %w", b.opts.From, err)
	}
	return b.settle(ctx, timeout)
}

// settle waits until systemd has finished booting (cloud-init's stages
// included), so the memory state is a quiet guest; a guest without
// systemd is taken as it is.
func (b *goldenBuild) settle(ctx context.Context, timeout time.Duration) error {
	start := time.Now()
	r, err := b.ac.Do(ctx, agent.Request{Op: agent.OpExec, Argv: []string{"/bin/sh", "-c", "command -v systemctl >/dev/null || exit 0; systemctl is-system-running --wait"}, Timeout: agent.Duration(timeout)})
	if err != nil {
		return fmt.Errorf("golden boot of %q: waiting for the boot to finish: %w", b.opts.From, err)
	}
	b.log.Info("golden boot settled", zap.Duration("took", time.Since(start)), zap.ByteString("state", r.Stdout))
	return nil
}

// fromDescribe writes vm.json and the attributes of the built image.
func (b *goldenBuild) fromDescribe(context.Context) error {
	g, src, dir := b.g, b.from, b.opts.WorkDir
	used := b.m.Spec()
	tmpl := used
	tmpl.Name, tmpl.Dir, tmpl.Kernel, tmpl.Initrd, tmpl.Append, tmpl.Incoming = "", "", "", "", "", nil
	tmpl.Disks = []vmm.Disk{{Format: vmm.QCOW2, Interface: used.Disks[0].Interface}}
	tmpl.Channels = []vmm.Channel{{Name: used.Channels[0].Name}}
	g.Config = VMConfig{Version: 1, Spec: tmpl, Root: RootFile, Memory: MemoryFile}
	cfgPath := filepath.Join(dir, ConfigFile)
	if err := writeJSON(cfgPath, g.Config); err != nil {
		return err
	}
	sa := src.manifest.GetAttributes()
	kind := src.kind
	if kind == imagev1.GuestAgent_GUEST_AGENT_CLOUD_INIT {
		kind = imagev1.GuestAgent_GUEST_AGENT_QEMU_GA
	}
	g.Attrs = &imagev1.ImageAttributes{
		Actions: append(append([]*imagev1.Action(nil), sa.GetActions()...), b.performed...),
		Arch:    sa.GetArch(), Vcpus: uint32(used.VCPUs), MemoryMib: uint64(used.MemoryMiB), Os: sa.GetOs(),
		Parent: b.opts.From, Boot: imagev1.Boot_BOOT_FIRMWARE, GuestAgent: kind,
		Labels: map[string]string{},
	}
	maps.Copy(g.Attrs.Labels, sa.GetLabels())
	g.Attrs.Labels["built-from"] = b.opts.From
	maps.Copy(g.Attrs.Labels, b.opts.Labels)
	g.Files = []imageclient.PublishFile{
		{Name: ConfigFile, Path: cfgPath, Kind: imagev1.FileKind_FILE_KIND_CONFIG},
		{Name: RootFile, Path: b.root, Kind: imagev1.FileKind_FILE_KIND_DISK},
		{Name: MemoryFile, Path: b.mem, Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE},
	}
	return nil
}
