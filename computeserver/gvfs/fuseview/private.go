package fuseview

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// mountPrivate mounts root on dir with the connection's /dev/fuse
// descriptor closed on exec. go-fuse (v2.12.1, the latest release) opens
// /dev/fuse without O_CLOEXEC when it mounts directly, so every process
// the compute server starts (every QEMU) would inherit the connection: when
// the compute server dies the connection stays up with nobody serving it,
// and the QEMUs hang in fuse_flush for ever. The descriptor is marked
// before any fork can happen: as root, go-fuse mounts directly (strict, so
// it never forks fusermount) under syscall.ForkLock, which os/exec takes
// to fork. Without root, go-fuse goes through fusermount and marks the
// descriptor itself.
func mountPrivate(dir string, root fs.InodeEmbedder, opts *fs.Options) (*fuse.Server, error) {
	direct := os.Geteuid() == 0
	if direct {
		opts.DirectMountStrict = true
		syscall.ForkLock.RLock()
	}
	server, err := fuse.NewServer(fs.NewNodeFS(root, opts), dir, &opts.MountOptions)
	if err == nil {
		err = closeFuseOnExec()
	}
	if direct {
		syscall.ForkLock.RUnlock()
	}
	if server == nil {
		return nil, err
	}
	go server.Serve()
	if werr := server.WaitMount(); werr != nil || err != nil {
		_ = server.Unmount()
		return nil, errors.Join(werr, err)
	}
	return server, nil
}

// closeFuseOnExec sets FD_CLOEXEC on every /dev/fuse descriptor of the
// process.
func closeFuseOnExec() error {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && target == "/dev/fuse" {
			syscall.CloseOnExec(fd)
		}
	}
	return nil
}
