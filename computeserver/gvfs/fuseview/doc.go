// Package fuseview is the FUSE view of a gvfs.Proxy: MOUNT/IMAGE/FILE for
// every image and persistent disk the upstream knows. Golden files are
// read-only and keep the kernel page cache across opens (a file never
// changes; a name published again gets a new inode); disk files are
// read-write. A VM monitor opens them as ordinary files.
//
// Every file operation is one call on the core's gvfs.File (a Read is one
// ReadAt); the view registers with the proxy (gvfs.View) so the proxy can
// have the kernel drop cached pages and unmount it when it closes.
//
// # Errors
//
// FUSE calls return errno values: ENOENT for unknown images and files, EROFS
// for writes to golden files, EPERM for size changes, ENOSPC for writes past
// the end of a disk, EIO when the upstream fails.
//
// # Crashes
//
// The /dev/fuse descriptor is closed on exec, so the processes a compute
// server starts (QEMU) never hold the connection: when the server dies, the
// kernel ends the connection and their I/O fails instead of hanging. A
// mount left by a dead server is found in /proc/self/mountinfo (never by a
// stat, which could hang on it), aborted through
// /sys/fs/fuse/connections/N/abort and detached before the view mounts
// again.
package fuseview
