package imagebuild

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/services"
)

// Stock builds the project's own "stock" cloud image: a Debian disk as a
// distribution would ship one for clouds, a stand-in for a downloaded cloud
// image (there is no internet here). It is NOT a recipe of golden images:
// it has no vmgrid agent and no memory state; vmgrid imports it as a user
// imports any qcow2 (vmgrid image import --agent cloud-init).
//
// The disk is an MBR disk that firmware (SeaBIOS) boots with no -kernel:
// partition 1 is FAT with SYSLINUX, the kernel and the initramfs; partition
// 2 is the ext4 root (/dev/vda2 on a virtio disk). Everything is built as
// separate images and assembled with sfdisk and dd, so nothing is
// loop-mounted. The guest has systemd, udev, Debian's cloud kernel with
// initramfs-tools, cloud-init (NoCloud only, modules trimmed for a fast
// first boot), qemu-guest-agent and openssh-server.
type Stock struct {
	// CacheDir keeps the debootstrap tarball and the built qcow2 (empty:
	// DefaultCacheDir()).
	CacheDir string
	Logger   *zap.Logger
}

// StockVersion is part of the qcow2's cache key (the debootstrap tarball
// has its own): bump it when what Build does to the tree changes.
const StockVersion = "4"

// stockPackages are what the stock image adds to debootstrap's minbase.
var stockPackages = []string{
	"systemd-sysv", "udev", "e2fsprogs", "linux-image-cloud-amd64", "initramfs-tools",
	"cloud-init", "qemu-guest-agent", "openssh-server", "sudo",
	// debootstrap does not resolve virtual packages: python3-cryptography
	// (cloud-init) needs python3-cffi-backend-api-*, which this provides.
	"python3-cffi-backend",
}

// StockCmdline is the kernel command line of the stock image.
const StockCmdline = "root=/dev/vda2 ro console=ttyS0 panic=-1 net.ifnames=0"

// stockCloudCfg trims cloud-init to what a first boot under TCG needs: the
// NoCloud seed only, host keys of two quick types, and the modules that
// apply hostname, users, files and commands — all in the init stage, so
// the config and final stages (each a Python start, 16 s under TCG) are
// masked: a first boot reaches its commands about 30 s sooner.
const stockCloudCfg = `# vmgrid stock image: NoCloud only, one stage, modules trimmed for a fast first boot.
datasource_list: [NoCloud, None]
ssh_genkeytypes: [ed25519, ecdsa]
cloud_init_modules: [seed_random, write_files, set_hostname, update_hostname, update_etc_hosts, users_groups, ssh, runcmd, scripts_user]
cloud_config_modules: []
cloud_final_modules: []
`

// stockMasked are units the stock image does not start: the cloud-init
// stages it folds into init, and what costs boot time for nothing in a
// short-lived clone.
var stockMasked = []string{"cloud-config.service", "cloud-final.service", "e2scrub_reap.service", "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
	"modprobe@efi_pstore.service", "modprobe@drm.service", "modprobe@loop.service", "modprobe@dm_mod.service", "systemd-binfmt.service"}

// stockBlacklist keeps udev from loading modules a clone has no use for
// (each modprobe is slow under TCG): virtualisation and CPU frequency
// drivers the emulated CPU's features invite.
const stockBlacklist = "# vmgrid stock image: modules a TCG clone has no use for\n" +
	"blacklist kvm\nblacklist kvm_amd\nblacklist kvm_intel\nblacklist irqbypass\nblacklist powernow_k8\nblacklist acpi_cpufreq\nblacklist pcspkr\n"

// stockInitramfs makes the initramfs hold only what finds a virtio root
// (ext4 is built into the cloud kernel): a 15 MB initramfs of "most"
// modules costs seconds of a TCG boot.
const stockInitramfs = "MODULES=list\n"

func (s *Stock) log() *zap.Logger { return services.LoggerOr(s.Logger) }

func (s *Stock) bootstrap() Bootstrap {
	return Bootstrap{Suite: "bookworm", Variant: "minbase", Packages: stockPackages, CacheDir: s.CacheDir, Version: "stock-1", Logger: s.Logger}
}

// Path is where Build keeps the qcow2 (it may not exist yet): keyed by the
// debootstrap key and StockVersion, so a new package set or a new way of
// building builds anew.
func (s *Stock) Path() string {
	b := s.bootstrap()
	return filepath.Join(filepath.Dir(b.TarballPath()), "..", "stock", "stock-"+b.Key()+"-v"+StockVersion+".qcow2")
}

// Build returns the cached qcow2, building it first if missing. Builders
// in other processes (tests of one CI run) wait on a file lock and reuse it.
func (s *Stock) Build(ctx context.Context) (string, error) {
	out := filepath.Clean(s.Path())
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", err
	}
	unlock, err := lockFile(ctx, filepath.Join(filepath.Dir(out), ".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	start := time.Now()
	tmp, err := os.MkdirTemp(filepath.Dir(out), ".build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	if err := s.build(ctx, tmp); err != nil {
		return "", fmt.Errorf("stock image: %w", err)
	}
	if err := os.Rename(filepath.Join(tmp, "stock.qcow2"), out); err != nil {
		return "", err
	}
	s.log().Info("stock image built", zap.String("qcow2", out), zap.Duration("took", time.Since(start)))
	return out, nil
}

// build makes tmp/stock.qcow2.
func (s *Stock) build(ctx context.Context, tmp string) error {
	root := filepath.Join(tmp, "root")
	if err := s.bootstrap().Extract(ctx, root); err != nil {
		return err
	}
	kernel, initrd, err := s.configure(ctx, root)
	if err != nil {
		return err
	}
	bootImg, rootImg := filepath.Join(tmp, "boot.vfat"), filepath.Join(tmp, "root.ext4")
	if err := makeBootFAT(ctx, bootImg, kernel, initrd); err != nil {
		return err
	}
	if err := os.RemoveAll(filepath.Join(root, "boot")); err != nil { // the kernel lives on partition 1
		return err
	}
	if err := os.MkdirAll(filepath.Join(root, "boot"), 0o755); err != nil {
		return err
	}
	size, err := treeSize(root)
	if err != nil {
		return err
	}
	rootSize := (size*13/10 + 256<<20) &^ (1<<20 - 1)
	if err := MakeExt4(ctx, root, rootImg, rootSize, nil); err != nil {
		return err
	}
	raw := filepath.Join(tmp, "disk.raw")
	if err := assembleMBR(ctx, raw, bootImg, rootImg); err != nil {
		return err
	}
	_, err = run(ctx, "", "qemu-img", "convert", "-q", "-O", "qcow2", raw, filepath.Join(tmp, "stock.qcow2"))
	return err
}

// configure makes the debootstrapped tree a cloud image and returns its
// kernel and initramfs.
func (s *Stock) configure(ctx context.Context, root string) (kernel, initrd string, err error) {
	files := map[string]string{
		// No fsck at boot (5 s under TCG): the disk is a fresh image.
		"/etc/fstab":                           "/dev/vda2 / ext4 errors=remount-ro 0 0\n",
		"/etc/initramfs-tools/conf.d/vmgrid":   stockInitramfs,
		"/etc/initramfs-tools/modules":         "virtio_pci\nvirtio_blk\n",
		"/etc/modprobe.d/vmgrid.conf":          stockBlacklist,
		"/etc/hostname":                        "stock\n",
		"/etc/machine-id":                      "", // made at first boot
		"/etc/cloud/cloud.cfg.d/90-vmgrid.cfg": stockCloudCfg,
	}
	for p, c := range files {
		if err := writeFile(root, p, []byte(c), 0o644); err != nil {
			return "", "", err
		}
	}
	// Host keys are made per instance by cloud-init, not shared by every
	// copy of the image.
	keys, _ := filepath.Glob(filepath.Join(root, "etc/ssh/ssh_host_*"))
	for _, k := range keys {
		os.Remove(k)
	}
	os.Remove(filepath.Join(root, "var/lib/dbus/machine-id"))
	// What a cloud image leaves out: documentation and translations, a
	// fifth of the disk every import publishes and every clone may read.
	for _, d := range []string{"usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale"} {
		if err := os.RemoveAll(filepath.Join(root, d)); err != nil {
			return "", "", err
		}
	}
	for _, u := range stockMasked {
		p := filepath.Join(root, "etc/systemd/system", u)
		os.Remove(p)
		if err := os.Symlink("/dev/null", p); err != nil {
			return "", "", err
		}
	}
	kernels, _ := filepath.Glob(filepath.Join(root, "boot/vmlinuz-*"))
	if len(kernels) == 1 {
		release := strings.TrimPrefix(filepath.Base(kernels[0]), "vmlinuz-")
		if _, err := run(ctx, "", "chroot", root, "mkinitramfs", "-o", "/boot/initrd.img-"+release, release); err != nil {
			return "", "", fmt.Errorf("the stock image's initramfs: %w", err)
		}
	}
	initrds, _ := filepath.Glob(filepath.Join(root, "boot/initrd.img-*"))
	if len(kernels) != 1 || len(initrds) != 1 {
		return "", "", fmt.Errorf("want one kernel and one initramfs in /boot, found %v and %v", kernels, initrds)
	}
	return kernels[0], initrds[0], nil
}

// makeBootFAT writes partition 1: FAT with the kernel, the initramfs and
// SYSLINUX's configuration (the boot sector is installed on the assembled
// disk). Hidden sectors = the partition's start, as a BIOS boot needs.
func makeBootFAT(ctx context.Context, img, kernel, initrd string) error {
	if _, err := run(ctx, "", "mkfs.vfat", "-C", "-n", "BOOT", "-h", strconv.Itoa(bootStartSector), img, strconv.Itoa(bootMiB*1024)); err != nil {
		return err
	}
	cfg := filepath.Join(filepath.Dir(img), "syslinux.cfg")
	conf := "SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND " + StockCmdline + "\n"
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		return err
	}
	for src, dst := range map[string]string{kernel: "::vmlinuz", initrd: "::initrd.img", cfg: "::syslinux.cfg"} {
		if _, err := run(ctx, "", "mcopy", "-i", img, src, dst); err != nil {
			return err
		}
	}
	return nil
}

// Partition layout of the stock disk, in 512-byte sectors.
const (
	bootStartSector = 2048 // 1 MiB, aligned
	bootMiB         = 96
)

// assembleMBR writes the disk: an MBR partition table (1: FAT, bootable;
// 2: Linux), the two partition images at their offsets, SYSLINUX in
// partition 1 (through mtools, on the unmounted image) and its MBR code.
func assembleMBR(ctx context.Context, disk, boot, root string) error {
	fi, err := os.Stat(root)
	if err != nil {
		return err
	}
	rootStart := bootStartSector + bootMiB*2048
	total := int64(rootStart)*512 + fi.Size() + 1<<20
	f, err := os.Create(disk)
	if err != nil {
		return err
	}
	err = f.Truncate(total)
	f.Close()
	if err != nil {
		return err
	}
	table := fmt.Sprintf("label: dos\n%d,%d,c,*\n%d,%d,83\n", bootStartSector, bootMiB*2048, rootStart, fi.Size()/512)
	if err := runStdin(ctx, table, "sfdisk", "-q", disk); err != nil {
		return err
	}
	for img, sector := range map[string]int{boot: bootStartSector, root: rootStart} {
		if _, err := run(ctx, "", "dd", "if="+img, "of="+disk, "bs=1M", "conv=notrunc,sparse", "oflag=seek_bytes", "seek="+strconv.Itoa(sector*512), "status=none"); err != nil {
			return err
		}
	}
	if _, err := run(ctx, "", "syslinux", "--install", "--offset", strconv.Itoa(bootStartSector*512), disk); err != nil {
		return err
	}
	_, err = run(ctx, "", "dd", "if=/usr/lib/syslinux/mbr/mbr.bin", "of="+disk, "bs=440", "count=1", "conv=notrunc", "status=none")
	return err
}

// treeSize is the bytes of the regular files under dir.
func treeSize(dir string) (int64, error) {
	var n int64
	err := filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return err
	})
	return n, err
}

func runStdin(ctx context.Context, stdin, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return nil
}
