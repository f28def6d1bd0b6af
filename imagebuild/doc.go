// Package imagebuild builds the files of golden images on this machine: a
// kernel for direct boot, an initramfs, a root disk and the kernel command
// line, plus the attributes an image server catalogues them under. Nothing
// is downloaded but one Debian kernel package; everything else comes from
// the build host (busybox-static, e2fsprogs).
//
// # Recipes
//
// A [Recipe] builds one kind of image into a directory and returns an
// [Image] describing the files (also written there as image.json, paths
// relative, so the directory can be published as a unit; [ReadManifest]
// loads it back). [Tiny] is the first recipe: Debian's cloud kernel, a
// ~2.5 MB initramfs and a 256 MiB ext4 root with busybox and a shell-script
// init. A bigger image (Debian minbase through debootstrap) is one more
// Recipe built from the same pieces: [KernelSource] for the kernel,
// [Kernel.InstallModules] for the drivers the kernel lacks, [WriteInitramfs]
// and [MakeExt4] for the artefacts; only the way the root directory is
// filled differs.
//
// Callers add their own files before the root disk is sealed with
// Tiny.ExtraFiles (guest path → host path; the guest agent binary goes in
// that way) or Tiny.Customize (a callback on the root directory).
//
// # The guest's contract
//
// Every image's init prints [ReadyMarker] ("vmgrid-guest: ready
// uptime=SECONDS") on the serial console (ttyS0) once its userland is up:
// that is what a VMM driver waits for. The tiny image then runs its hook
// ([HookPath], Tiny.Hook; it can read /proc/cmdline for per-boot options)
// and powers off when the hook returns, so the guest lives exactly as long
// as its workload. The root file system is mounted read-only; /run and /tmp
// are tmpfs.
//
// # Boot path and why
//
// Debian's cloud kernel has NVMe and ext4 built in but virtio only as
// modules. A root on NVMe boots with no initramfs, but QEMU 7.2 refuses to
// migrate (so to suspend) a machine with an NVMe device. The tiny image
// therefore boots from a virtio-blk root (/dev/vda, [RootVirtio], the
// default) through its initramfs: /init loads virtio_ring, virtio,
// virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio_pci, virtio_blk and
// virtio_console in that order (resolved from each module's .modinfo, as
// the extracted package has no modules.dep), waits for the root= device,
// mounts it and switch_roots to the disk's /sbin/init. The same disk also
// boots from NVMe without the initramfs ([RootNVMe], [TinyCmdlineNVMe]);
// its init loads whichever modules are not loaded yet.
//
// Both the initramfs and the disk contain /dev/console and /dev/null, and
// both inits mount devtmpfs first: the kernel opens /dev/console for init
// before anything is mounted, and on a read-only root without /dev/null a
// shell silently skips every `cmd 2>/dev/null`. The nodes are made without
// privilege: by the cpio writer in the initramfs and by debugfs in the ext4
// image.
//
// # Kernel cache
//
// [KernelSource] follows the meta package linux-image-cloud-amd64 to the
// current linux-image-<release> package (apt-cache), downloads that one
// package (apt-get download; apt-get update once if that fails) and
// extracts it (dpkg -x) under [DefaultCacheDir]/kernels, one directory per
// package version. The resolution is remembered until the apt indexes
// change, so a warm build runs no apt at all. Downloads and extractions run
// under a flock and are published by rename, so concurrent builders (test
// packages running in parallel, several compute servers sharing a cache)
// are safe. Old versions are never pruned.
//
// # Requirements
//
// Debian packages: apt and dpkg (always there), busybox-static,
// e2fsprogs (mkfs.ext4, debugfs). Building needs no root (device nodes are
// written into the images directly), but apt-get update does; files in the
// root disk keep the builder's owner.
package imagebuild
