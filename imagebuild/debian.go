package imagebuild

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/vmgrid/vmgrid/services"
	"go.uber.org/zap"
)

// DebianVersion is the debian recipe's version: part of the debootstrap
// cache key, so a change to what the recipe bootstraps is not served from
// an old tarball. Bump it when DebianBasePackages or the variant change.
const DebianVersion = "1"

// DebianImageVersion versions what the recipe makes of the debootstrap
// (units, drop-ins, initramfs): caches of built images (the tests') key on
// it. Bump it with any such change; DebianVersion only when the debootstrap
// itself changes.
const DebianImageVersion = "2"

// DebianSuite is the release the debian recipe bootstraps (Debian 12).
const DebianSuite = "bookworm"

// DebianBasePackages are what every debian image has on top of minbase:
// systemd as init, udev (it names the agent's port), sshd, ip and CA
// certificates.
var DebianBasePackages = []string{"systemd", "systemd-sysv", "udev", "openssh-server", "iproute2", "ca-certificates"}

// DebianAgentPath is where the debian recipe installs the guest agent.
const DebianAgentPath = "/usr/sbin/vmgrid-agent"

// DebianReady is the command a golden builder runs through the agent to wait
// for the end of the boot: systemd's state once no job is left
// (is-system-running --wait), which must be "running" — "degraded" names
// the failed units.
var DebianReady = []string{"/bin/sh", "-c", `state=$(systemctl is-system-running --wait); echo "$state"
[ "$state" = running ] && exit 0
systemctl --failed --no-legend --plain; exit 1`}

// DebianMasked are units that do nothing useful in a clone of a golden
// image and cost boot time under TCG (timers of a long-lived host, a
// console nobody has, fsck of a file system made a minute ago). Masking
// those the packages do not ship is harmless.
var DebianMasked = []string{
	"apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
	"e2scrub_reap.service", "fstrim.timer", "systemd-tmpfiles-clean.timer",
	"getty@tty1.service", "systemd-pstore.service", "systemd-fsck-root.service",
	"systemd-hwdb-update.service", "ldconfig.service", "systemd-firstboot.service",
	"proc-sys-fs-binfmt_misc.automount", "systemd-binfmt.service",
	"sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
	"systemd-remount-fs.service", "systemd-journal-flush.service", "systemd-update-utmp.service",
	"systemd-update-utmp-runlevel.service", "getty-static.service", "dev-hugepages.mount",
	"modprobe@drm.service", "modprobe@efi_pstore.service", "modprobe@fuse.service", "modprobe@configfs.service", "modprobe@dm_mod.service", "modprobe@loop.service",
}

// DebianCmdline is the debian image's kernel command line for a virtio
// root: the root is mounted read-write by the initramfs (no fsck, no
// remount), systemd is init. See TinyCmdline for panic= and init_on_free=.
const DebianCmdline = "console=ttyS0 root=/dev/vda rootfstype=ext4 rootwait rw panic=-1 init_on_free=1 fsck.mode=skip systemd.show_status=auto"

// Debian is a Debian 12 golden image: a debootstrap (minbase, systemd,
// udev, openssh-server, iproute2, ca-certificates and Packages) cached as a
// tarball, Debian's cloud kernel booted directly with the tiny recipe's
// busybox initramfs (it loads the virtio modules, mounts the virtio-blk root
// and switch_roots into systemd), and an ext4 root disk made with
// mkfs.ext4 -d (no loop mounts). The guest agent, when Agent is set, is a
// systemd service that udev starts when its virtio-serial port appears.
//
// SSH host keys are not in the image: sshd starts only once they exist
// (a drop-in condition), so a clone makes its own before sshd accepts a
// connection (the plant's identity step). Password logins are off; root
// has no password.
type Debian struct {
	// Kernels supplies the kernel; nil means a KernelSource with defaults.
	Kernels *KernelSource
	// Packages are installed on top of DebianBasePackages.
	Packages []string
	// Mirror and CacheDir are the Bootstrap's (empty: the machine's apt
	// mirror, DefaultCacheDir()).
	Mirror, CacheDir string
	// Agent is the host path of the static guest agent; empty installs none.
	Agent string
	// Busybox for the initramfs (empty: /bin/busybox, busybox-static).
	Busybox string
	// DiskSize is the root disk's size in bytes; 0 means 1 GiB.
	DiskSize int64
	// Hostname of the image (clones set their own); empty means "debian".
	Hostname string
	// ExtraCmdline is appended to the kernel command line.
	ExtraCmdline []string
	// ExtraFiles are copied into the root (guest path → host path).
	ExtraFiles map[string]string
	// Customize runs last on the root directory before mkfs.
	Customize func(ctx context.Context, rootDir string) error
	// VCPUs and MemoryMiB are the image's attributes; 0 means 1 and 512.
	VCPUs     int
	MemoryMiB int
	Logger    *zap.Logger
}

var _ Recipe = (*Debian)(nil)

// Name implements Recipe.
func (d *Debian) Name() string { return "debian" }

// Bootstrap is the debootstrap run the image starts from.
func (d *Debian) Bootstrap() Bootstrap {
	return Bootstrap{
		Suite: DebianSuite, Variant: "minbase", Packages: append(append([]string(nil), DebianBasePackages...), d.Packages...),
		Mirror: d.Mirror, CacheDir: d.CacheDir, Version: DebianVersion, Logger: d.Logger,
	}
}

// Build implements Recipe: outDir receives vmlinuz, initrd.img, root.raw
// and image.json. The debootstrap and the kernel come from their caches.
func (d *Debian) Build(ctx context.Context, outDir string) (*Image, error) {
	start := time.Now()
	log := services.LoggerOr(d.Logger)
	bs := d.Bootstrap()
	// Before anything long: a bad package name fails here.
	if err := bs.Validate(ctx); err != nil {
		return nil, fmt.Errorf("debian: %w", err)
	}
	src := d.Kernels
	if src == nil {
		src = &KernelSource{Logger: log, CacheDir: d.CacheDir}
	}
	k, err := src.Fetch(ctx)
	if err != nil {
		return nil, fmt.Errorf("debian: %w", err)
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, err
	}
	if outDir, err = filepath.Abs(outDir); err != nil {
		return nil, err
	}
	rootDir, err := os.MkdirTemp(outDir, ".root-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(rootDir)
	tarStart := time.Now()
	if err := bs.Extract(ctx, rootDir); err != nil {
		return nil, fmt.Errorf("debian: %w", err)
	}
	log.Info("debian root from debootstrap", zap.Duration("took", time.Since(tarStart)))
	tiny := &Tiny{Busybox: d.Busybox}
	mods, err := k.InstallModules(rootDir, tiny.modules()...)
	if err != nil {
		return nil, fmt.Errorf("debian: %w", err)
	}
	if err := d.populate(ctx, rootDir); err != nil {
		return nil, fmt.Errorf("debian: %w", err)
	}
	initrdDir, err := os.MkdirTemp(outDir, ".initrd-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(initrdDir)
	if err := tiny.populateInitramfs(ctx, initrdDir, k); err != nil {
		return nil, fmt.Errorf("debian: initramfs: %w", err)
	}
	img := d.image(outDir, k, mods)
	if err := d.seal(ctx, outDir, img, rootDir, initrdDir, k); err != nil {
		return nil, err
	}
	log.Info("image built", zap.String("recipe", d.Name()), zap.String("dir", outDir),
		zap.String("kernel", k.Release), zap.Duration("took", time.Since(start)))
	return img, nil
}

func (d *Debian) image(outDir string, k *Kernel, mods []Module) *Image {
	img := newImage(d.Name(), outDir, k, RootVirtio, strings.Join(append([]string{DebianCmdline}, d.ExtraCmdline...), " "), mods,
		Attributes{Arch: "x86_64", VCPUs: orDefault(d.VCPUs, 1), MemoryMiB: orDefault(d.MemoryMiB, 512), OS: "debian-12"})
	img.Ready = DebianReady
	return img
}

func (d *Debian) seal(ctx context.Context, outDir string, img *Image, rootDir, initrdDir string, k *Kernel) error {
	size := d.DiskSize
	if size == 0 {
		size = 1 << 30
	}
	// No nodes to add: the debootstrapped /dev has them (tar kept them).
	return sealImage(ctx, outDir, img, rootDir, initrdDir, k, size, nil)
}

// populate configures the debootstrapped tree: identity files, fstab, the
// agent and its unit, sshd without host keys, masked units.
func (d *Debian) populate(ctx context.Context, rootDir string) error {
	host := d.Hostname
	if host == "" {
		host = "debian"
	}
	files := map[string]string{
		"/etc/hostname": host + "\n",
		"/etc/hosts":    "127.0.0.1\tlocalhost\n127.0.1.1\t" + host + "\n::1\tlocalhost ip6-localhost ip6-loopback\n",
		// The root is not listed: the initramfs mounts it read-write as the
		// kernel command line says, and a listed root makes systemd wait for
		// udev to announce /dev/vda (10 s under TCG) and remount it.
		"/etc/fstab": "# written by vmgrid's debian recipe: the initramfs mounts / (see the kernel command line)\n",
		// Empty: systemd makes one at the first boot; every clone gets its
		// own from the plant (a golden's id would be every clone's).
		"/etc/machine-id":                               "",
		"/etc/ssh/sshd_config.d/vmgrid.conf":            "# vmgrid: keys only\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
		"/etc/systemd/system/ssh.service.d/vmgrid.conf": "# vmgrid: the image has no host keys; a clone gets its own, then sshd starts\n[Unit]\nConditionPathExists=/etc/ssh/ssh_host_ed25519_key\n",
		// Starts sshd when the clone's keys appear (the agent writes the
		// ed25519 key last), without the agent running systemctl.
		"/etc/systemd/system/vmgrid-sshd.path": "[Unit]\nDescription=start sshd once this machine has its own host keys\n\n[Path]\nPathExists=/etc/ssh/ssh_host_ed25519_key\nUnit=ssh.service\n\n[Install]\nWantedBy=multi-user.target\n",
		// Nothing to flush a journal to that outlives a clone's boot.
		"/etc/systemd/journald.conf.d/vmgrid.conf": "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n",
	}
	if err := writeFiles(rootDir, files); err != nil {
		return err
	}
	_ = os.Remove(filepath.Join(rootDir, "var/lib/dbus/machine-id"))
	keys, _ := filepath.Glob(filepath.Join(rootDir, "etc/ssh/ssh_host_*"))
	for _, k := range keys {
		if err := os.Remove(k); err != nil {
			return err
		}
	}
	for _, u := range DebianMasked {
		link := filepath.Join(rootDir, "etc/systemd/system", u)
		_ = os.Remove(link)
		if err := os.Symlink("/dev/null", link); err != nil {
			return fmt.Errorf("mask %s: %w", u, err)
		}
	}
	if err := os.Symlink("../vmgrid-sshd.path", filepath.Join(rootDir, "etc/systemd/system/multi-user.target.wants/vmgrid-sshd.path")); err != nil {
		return err
	}
	if d.Agent != "" {
		if err := installAgentUnit(rootDir, d.Agent); err != nil {
			return err
		}
	}
	if err := copyExtraFiles(rootDir, d.ExtraFiles); err != nil {
		return err
	}
	if d.Customize != nil {
		if err := d.Customize(ctx, rootDir); err != nil {
			return fmt.Errorf("customize: %w", err)
		}
	}
	return nil
}

// agentDevice is the device unit of the agent's port: udev's default rules
// link /dev/virtio-ports/NAME to the port, and the rule below tags it for
// systemd.
const agentDevice = `dev-virtio\x2dports-org.vmgrid.agent.0.device`

// installAgentUnit installs the agent at DebianAgentPath with a unit bound
// to its port's device: udev wants the service when the port appears, and
// systemd stops it if the port goes (a hot-unplugged channel).
func installAgentUnit(rootDir, agent string) error {
	if err := copyFile(agent, guestJoin(rootDir, DebianAgentPath), 0o755); err != nil {
		return fmt.Errorf("install the agent: %w", err)
	}
	unit := `[Unit]
Description=vmgrid guest agent (virtio-serial org.vmgrid.agent.0)
BindsTo=` + agentDevice + `
After=` + agentDevice + `
# Early: the plant talks to it while the rest of the boot goes on.
DefaultDependencies=no
After=local-fs.target
Before=shutdown.target
Conflicts=shutdown.target

[Service]
ExecStart=` + DebianAgentPath + `
Restart=always
RestartSec=200ms
`
	rule := `# vmgrid: start the guest agent when its virtio-serial port appears.
SUBSYSTEM=="virtio-ports", ATTR{name}=="org.vmgrid.agent.0", TAG+="systemd", ENV{SYSTEMD_WANTS}+="vmgrid-agent.service"
`
	return writeFiles(rootDir, map[string]string{
		"/etc/systemd/system/vmgrid-agent.service": unit,
		"/etc/udev/rules.d/90-vmgrid-agent.rules":  rule,
	})
}

func writeFiles(rootDir string, files map[string]string) error {
	for p, data := range files {
		if err := writeFile(rootDir, p, []byte(data), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// copyExtraFiles copies host files into rootDir (guest path → host path),
// keeping the host file's permission bits.
func copyExtraFiles(rootDir string, extra map[string]string) error {
	guestPaths := make([]string, 0, len(extra))
	for g := range extra {
		guestPaths = append(guestPaths, g)
	}
	sort.Strings(guestPaths)
	for _, g := range guestPaths {
		host := extra[g]
		fi, err := os.Stat(host)
		if err != nil {
			return fmt.Errorf("extra file %s: %w", g, err)
		}
		dst := guestJoin(rootDir, g)
		_ = os.Remove(dst) // replace a link rather than write through it
		if err := copyFile(host, dst, fi.Mode().Perm()); err != nil {
			return fmt.Errorf("extra file %s: %w", g, err)
		}
	}
	return nil
}
