// Package vmm runs virtual machines: a [Driver] starts a [Machine] from a
// [Spec]; [QEMU] is the driver for qemu-system-x86_64, which guests reach
// unmodified through plain files (the FUSE view of golden images, qcow2
// overlays as clones' redo logs).
//
// # Contract
//
// Start launches the VMM and returns once its monitor answers; the guest is
// running (or, with Spec.Incoming, loading a memory state). Boot progress is
// read from the serial console: [Machine.WaitConsole] waits for a line, for
// instance imagebuild.ReadyMarker. A machine ends by [Machine.Stop] (quit,
// then SIGKILL after a timeout), [Machine.Kill], [Machine.Suspend], or by
// the guest powering off; [Machine.Wait] and [Machine.Exited] observe the
// end. Errors are [*MachineError]s carrying the end of the guest console
// and of QEMU's own output, which is where the reason usually is.
//
// # Files
//
// Everything a machine owns lives in Spec.Dir: qmp.sock (the monitor),
// console.log (ttyS0, written by QEMU as the guest prints) and qemu.log
// (QEMU's stdout and stderr). Channel sockets are where the Spec puts them.
// Unix socket paths are limited to 107 bytes; Validate says so before QEMU
// does.
//
// # Command line
//
// -accel tcg unless the Spec or the driver says kvm ([KVMWorks] finds out
// whether KVM really runs a guest; on the project's nested hosts it does
// not, /dev/kvm notwithstanding), -machine q35, -nodefaults -no-user-config
// -nographic -display none, -no-reboot (a guest reboot or a panic with
// panic=-1 ends the process instead of looping), the serial console into a
// chardev file, QMP on a unix socket (server=on,wait=off), direct kernel
// boot (-kernel, -initrd, -append). Disks are -drive if=none plus
// virtio-blk-pci (the default) or namespaces of one NVMe controller.
// Channels are virtserialports on one virtio-serial-pci controller, each
// backed by a unix socket QEMU listens on (a guest agent's line). A
// MemoryFile puts RAM in memory-backend-file (-machine memory-backend=ram0).
//
// # Suspend and resume
//
// Suspend raises the migration bandwidth cap (the default makes it about
// 7x slower), pauses the vCPUs, migrates into a file and quits. QEMU zero
// pages are not written: a 256 MiB tiny guest saves about 98 MB in under
// 0.1 s. The file is handed to QEMU as a descriptor over the monitor
// (getfd, "fd:" URI) instead of "exec:cat > FILE", so there is no helper
// process and no shell quoting; it is written as FILE.partial and renamed
// when complete. The disks are not part of the state: keep them (the clone's
// overlay) unchanged until restore.
//
// [Restore] starts a new QEMU with the same Spec (devices, memory size,
// machine type; a new Dir is fine) plus Incoming: -S -incoming defer, then
// getfd and migrate-incoming "fd:…". [Machine.Resume] waits for the state
// to load (status inmigrate → paused) and continues the vCPUs; about 0.1 s
// from a local file. The guest's wall clock stands still while suspended,
// so it is stale after resume: the guest agent must set it.
//
// With a shared MemoryFile (share=on), RAM is the file itself: Suspend
// sets x-ignore-shared and the state shrinks to device state (~0.3 MB). A
// clone restores with the same file mapped private (share=off, copy-on-write:
// pages are read on demand and never written back) and
// Incoming.IgnoreShared. QEMU 7.2 opens mem-path read-write even then.
//
// QEMU 7.2's NVMe device is not migratable: Suspend of a machine with an
// NVMe disk fails with QEMU's reason and leaves the guest running. Use
// virtio disks (and an initramfs that loads virtio_blk) for machines that
// will be suspended.
//
// # Process hygiene
//
// QEMU runs in its own process group with SIGKILL as its parent-death
// signal; Kill and the reaper signal the whole group, so nothing outlives
// the machine. (The parent-death signal follows the OS thread that started
// QEMU; Go does not retire threads unless a goroutine exits while locked to
// one, so do not call Start from such a goroutine.) Stop removes the
// sockets QEMU leaves behind when killed.
package vmm
