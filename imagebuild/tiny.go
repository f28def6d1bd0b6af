package imagebuild

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmgrid/vmgrid/services"
	"go.uber.org/zap"
)

// TinyModules are the modules the tiny image loads at boot: virtio over PCI,
// virtio block disks, and virtio_console for a virtio-serial agent channel.
// NVMe and ext4 are built into Debian's cloud kernel, so the root disk needs
// none of them.
var TinyModules = []string{
	"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
	"virtio_pci", "virtio_blk", "virtio_console",
}

// DefaultHook keeps the guest up and idle; the guest powers off when its
// hook returns.
const DefaultHook = "while :; do sleep 3600; done\n"

// HookPath is where the hook lives in the guest.
const HookPath = "/etc/vmgrid/hook"

// How a machine attaches an image's root disk (Image.RootInterface).
const (
	// RootVirtio: a virtio-blk disk, /dev/vda. The kernel has virtio only as
	// modules, so the image's initramfs loads them and mounts the root.
	// QEMU can suspend and migrate such a machine.
	RootVirtio = "virtio"
	// RootNVMe: the first NVMe namespace, /dev/nvme0n1. The kernel mounts it
	// itself (NVMe and ext4 are built in; the initramfs is optional), but
	// QEMU 7.2's NVMe device blocks migration: such a machine cannot be
	// suspended.
	RootNVMe = "nvme"
)

// Tiny is the smallest useful golden image: Debian's cloud kernel booted
// directly (no boot loader) with a small initramfs, from a read-only ext4
// root disk holding busybox, a few modules and a shell-script init. It boots
// to ReadyMarker in about three seconds under TCG.
//
// The zero value is usable. The initramfs (busybox, the virtio modules, an
// /init script) loads the modules in dependency order, waits for the root=
// device, mounts it and switch_roots to its /sbin/init. That init mounts
// devtmpfs, proc, sysfs and tmpfs on /run and /tmp, loads whatever modules
// are not loaded yet (so the root disk also boots without the initramfs, from
// NVMe), prints ReadyMarker on the console, runs the hook (HookPath) and
// powers the guest off when the hook returns.
type Tiny struct {
	// Kernels supplies the kernel; nil means a KernelSource with defaults
	// (DefaultCacheDir, DefaultKernelPackage).
	Kernels *KernelSource
	// Busybox is the host path of a static busybox (Debian's
	// busybox-static); empty means /bin/busybox.
	Busybox string
	// DiskSize is the root disk's size in bytes; 0 means 256 MiB.
	DiskSize int64
	// Modules to load at boot, dependencies added automatically; nil means
	// TinyModules.
	Modules []string
	// Hook is the shell script init runs after ReadyMarker (a "#!/bin/sh"
	// line is added unless it starts with "#!"). Its output goes to the
	// console. Empty means DefaultHook.
	Hook string
	// Root is how machines attach the root disk: RootVirtio (default;
	// suspendable) or RootNVMe. It sets root= on the kernel command line.
	Root string
	// Quiet adds "quiet" to the kernel command line: the console then shows
	// only what init and the hook print.
	Quiet bool
	// ExtraCmdline is appended to the kernel command line (the hook can read
	// it from /proc/cmdline).
	ExtraCmdline []string
	// ExtraFiles are copied into the root file system before it is sealed:
	// guest path → host path. The host file's permission bits are kept.
	ExtraFiles map[string]string
	// Customize, if set, runs last on the root directory before mkfs; use it
	// for anything ExtraFiles cannot express.
	Customize func(ctx context.Context, rootDir string) error
	// VCPUs and MemoryMiB are the image's attributes; 0 means 1 and 256.
	VCPUs     int
	MemoryMiB int
	// Logger receives progress; nil logs nothing.
	Logger *zap.Logger
}

var _ Recipe = (*Tiny)(nil)

// Name implements Recipe.
func (t *Tiny) Name() string { return "tiny" }

// TinyCmdline is the tiny image's kernel command line for a root disk
// attached as RootVirtio; TinyCmdlineNVMe for RootNVMe. panic=-1 turns a
// failed boot into a reboot, which a VMM started with -no-reboot sees as the
// guest exiting rather than hanging. init_on_free=1 zeroes freed memory:
// QEMU then writes those pages to a memory state as zero markers, not data,
// which makes the tiny image's memory state 26% smaller (45% compressed).
const (
	TinyCmdline     = "console=ttyS0 root=/dev/vda rootfstype=ext4 rootwait ro panic=-1 init_on_free=1"
	TinyCmdlineNVMe = "console=ttyS0 root=/dev/nvme0n1 rootfstype=ext4 rootwait ro panic=-1 init_on_free=1"
)

// Build implements Recipe: outDir receives vmlinuz, initrd.img, root.raw
// and image.json.
func (t *Tiny) Build(ctx context.Context, outDir string) (*Image, error) {
	start := time.Now()
	log := services.LoggerOr(t.Logger)
	src := t.Kernels
	if src == nil {
		src = &KernelSource{Logger: log}
	}
	k, err := src.Fetch(ctx)
	if err != nil {
		return nil, fmt.Errorf("tiny: %w", err)
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, err
	}
	outDir, err = filepath.Abs(outDir)
	if err != nil {
		return nil, err
	}
	rootIf, err := t.rootInterface()
	if err != nil {
		return nil, err
	}
	rootDir, err := os.MkdirTemp(outDir, ".root-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(rootDir)
	mods, err := t.populate(ctx, rootDir, k)
	if err != nil {
		return nil, fmt.Errorf("tiny: %w", err)
	}
	initrdDir, err := os.MkdirTemp(outDir, ".initrd-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(initrdDir)
	if err := t.populateInitramfs(ctx, initrdDir, k); err != nil {
		return nil, fmt.Errorf("tiny: initramfs: %w", err)
	}
	img := t.image(outDir, k, rootIf, mods)
	if err := t.seal(ctx, outDir, img, rootDir, initrdDir, k); err != nil {
		return nil, err
	}
	log.Info("image built", zap.String("recipe", t.Name()), zap.String("dir", outDir),
		zap.String("kernel", k.Release), zap.Bool("kernel_cached", k.Cached), zap.Duration("took", time.Since(start)))
	return img, nil
}

func (t *Tiny) rootInterface() (string, error) {
	switch t.Root {
	case "":
		return RootVirtio, nil
	case RootVirtio, RootNVMe:
		return t.Root, nil
	}
	return "", fmt.Errorf("tiny: Root %q: want %q or %q", t.Root, RootVirtio, RootNVMe)
}

// image describes the files Build writes into outDir.
func (t *Tiny) image(outDir string, k *Kernel, rootIf string, mods []Module) *Image {
	return newImage(t.Name(), outDir, k, rootIf, t.cmdline(rootIf), mods,
		Attributes{Arch: "x86_64", VCPUs: orDefault(t.VCPUs, 1), MemoryMiB: orDefault(t.MemoryMiB, 256), OS: "linux-busybox"})
}

// seal writes the image's files: the root disk and initramfs from their
// directories, the kernel, and image.json.
func (t *Tiny) seal(ctx context.Context, outDir string, img *Image, rootDir, initrdDir string, k *Kernel) error {
	size := t.DiskSize
	if size == 0 {
		size = 256 << 20
	}
	return sealImage(ctx, outDir, img, rootDir, initrdDir, k, size, BaseDeviceNodes)
}

// newImage describes the files a recipe writes into outDir: vmlinuz,
// initrd.img, root.raw.
func newImage(recipe, outDir string, k *Kernel, rootIf, cmdline string, mods []Module, attrs Attributes) *Image {
	return &Image{
		Recipe:        recipe,
		Kernel:        filepath.Join(outDir, "vmlinuz"),
		Initrd:        filepath.Join(outDir, "initrd.img"),
		KernelRelease: k.Release,
		KernelPackage: k.Package,
		KernelVersion: k.Version,
		RootDisk:      filepath.Join(outDir, "root.raw"),
		RootInterface: rootIf,
		Cmdline:       cmdline,
		Modules:       mods,
		Attributes:    attrs,
	}
}

// sealImage writes an image's files: the root disk (size bytes, with
// rootNodes) and the initramfs from their directories, the kernel, and
// image.json.
func sealImage(ctx context.Context, outDir string, img *Image, rootDir, initrdDir string, k *Kernel, size int64, rootNodes []DeviceNode) error {
	if err := MakeExt4(ctx, rootDir, img.RootDisk, size, rootNodes); err != nil {
		return fmt.Errorf("%s: root disk: %w", img.Recipe, err)
	}
	if err := WriteInitramfs(initrdDir, img.Initrd, BaseDeviceNodes); err != nil {
		return fmt.Errorf("%s: %w", img.Recipe, err)
	}
	// A copy, not a link into the cache: the output directory is published
	// as a unit and must not change if the cache is pruned.
	if err := copyFile(k.Vmlinuz, img.Kernel, 0o644); err != nil {
		return fmt.Errorf("%s: %w", img.Recipe, err)
	}
	if err := writeManifest(outDir, img); err != nil {
		return fmt.Errorf("%s: %w", img.Recipe, err)
	}
	return nil
}

func (t *Tiny) cmdline(rootIf string) string {
	parts := []string{TinyCmdline}
	if rootIf == RootNVMe {
		parts[0] = TinyCmdlineNVMe
	}
	if t.Quiet {
		parts = append(parts, "quiet")
	}
	parts = append(parts, t.ExtraCmdline...)
	return strings.Join(parts, " ")
}

// populate fills rootDir with the tiny userland and returns the modules
// init loads.
func (t *Tiny) populate(ctx context.Context, rootDir string, k *Kernel) ([]Module, error) {
	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "etc/vmgrid", "dev", "proc", "sys", "run", "tmp", "root", "var", "mnt", "lib/modules"} {
		if err := os.MkdirAll(filepath.Join(rootDir, d), 0o755); err != nil {
			return nil, err
		}
	}
	if err := os.Chmod(filepath.Join(rootDir, "tmp"), 0o1777); err != nil {
		return nil, err
	}
	mods, err := k.InstallModules(rootDir, t.modules()...)
	if err != nil {
		return nil, err
	}
	files := map[string]string{
		"/etc/hostname": "tiny\n",
		"/etc/passwd":   "root:x:0:0:root:/root:/bin/sh\n",
		"/etc/group":    "root:x:0:\n",
	}
	for p, data := range files {
		if err := writeFile(rootDir, p, []byte(data), 0o644); err != nil {
			return nil, err
		}
	}
	hook := t.Hook
	if hook == "" {
		hook = DefaultHook
	}
	if !strings.HasPrefix(hook, "#!") {
		hook = "#!/bin/sh\n" + hook
	}
	if err := writeFile(rootDir, HookPath, []byte(hook), 0o755); err != nil {
		return nil, err
	}
	if err := writeFile(rootDir, "/sbin/init", []byte(tinyInit(k.Release, mods)), 0o755); err != nil {
		return nil, err
	}
	// After /sbin/init exists, so busybox's init applet does not take it.
	if err := InstallBusybox(ctx, rootDir, t.busybox()); err != nil {
		return nil, err
	}
	if err := copyExtraFiles(rootDir, t.ExtraFiles); err != nil {
		return nil, err
	}
	if t.Customize != nil {
		if err := t.Customize(ctx, rootDir); err != nil {
			return nil, fmt.Errorf("customize: %w", err)
		}
	}
	return mods, nil
}

func (t *Tiny) modules() []string {
	if t.Modules == nil {
		return TinyModules
	}
	return t.Modules
}

// populateInitramfs fills dir with the initramfs: busybox, the modules and
// an /init that mounts the root disk.
func (t *Tiny) populateInitramfs(ctx context.Context, dir string, k *Kernel) error {
	for _, d := range []string{"dev", "proc", "sys", "newroot", "bin", "sbin", "usr/bin", "usr/sbin"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	mods, err := k.InstallModules(dir, t.modules()...)
	if err != nil {
		return err
	}
	if err := writeFile(dir, "/init", []byte(tinyInitramfsInit(k.Release, mods)), 0o755); err != nil {
		return err
	}
	return InstallBusybox(ctx, dir, t.busybox())
}

func (t *Tiny) busybox() string {
	if t.Busybox == "" {
		return "/bin/busybox"
	}
	return t.Busybox
}

// insmodLines loads mods in order, skipping those already loaded.
func insmodLines(b *strings.Builder, release string, mods []Module) {
	for _, m := range mods {
		fmt.Fprintf(b, "[ -d /sys/module/%s ] || insmod %s || echo 'vmgrid-guest: insmod %s failed'\n", m.Name, m.GuestPath(release), m.Name)
	}
}

// tinyInitramfsInit is the initramfs's /init.
func tinyInitramfsInit(release string, mods []Module) string {
	var b strings.Builder
	b.WriteString(`#!/bin/sh
# initramfs /init of the vmgrid "tiny" image, written by imagebuild: load the
# drivers the kernel has only as modules (virtio), mount the root= disk and
# hand over to its /sbin/init.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# Dependencies first (resolved from .modinfo at build time; there is no
# modules.dep, so modprobe would not work).
`)
	insmodLines(&b, release, mods)
	b.WriteString(`root= fstype=ext4 mode=ro init=/sbin/init
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	root=*) root=${arg#root=} ;;
	rootfstype=*) fstype=${arg#rootfstype=} ;;
	ro) mode=ro ;;
	rw) mode=rw ;;
	init=*) init=${arg#init=} ;;
	esac
done
fail() { echo "vmgrid-initramfs: $*"; poweroff -f; }
[ -n "$root" ] || fail "no root= on the kernel command line"
i=0
while [ ! -b "$root" ]; do
	i=$((i+1))
	[ $i -le 600 ] || fail "root device $root did not appear (have: $(ls /dev | tr '\n' ' '))"
	sleep 0.05
done
mount -t "$fstype" -o "$mode" "$root" /newroot || fail "cannot mount $root"
umount /sys /proc
mount --move /dev /newroot/dev
exec switch_root /newroot "$init"
`)
	return b.String()
}

// tinyInit is the root disk's /sbin/init.
func tinyInit(release string, mods []Module) string {
	var b strings.Builder
	b.WriteString(`#!/bin/sh
# /sbin/init of the vmgrid "tiny" golden image, written by imagebuild.
# The root file system is read-only; /run and /tmp are tmpfs. devtmpfs comes
# first: until it is mounted only the image's /dev/console and /dev/null exist
# (the initramfs, if there was one, moved its devtmpfs here already).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
hostname -F /etc/hostname
# Loaded by the initramfs already, unless the kernel mounted this disk
# itself (NVMe root without initramfs).
`)
	insmodLines(&b, release, mods)
	fmt.Fprintf(&b, `echo "%s uptime=$(cut -d' ' -f1 /proc/uptime)"
%s
echo "vmgrid-guest: hook exited with status $?"
sync
poweroff -f
`, ReadyMarker, HookPath)
	return b.String()
}

func orDefault(v, d int) int {
	if v == 0 {
		return d
	}
	return v
}
