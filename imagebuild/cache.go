package imagebuild

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// CacheDirEnv names the environment variable that overrides DefaultCacheDir.
// Tests and CI set it (or rely on the user cache directory) so the kernel
// package is downloaded once per machine, not once per test.
const CacheDirEnv = "VMGRID_CACHE_DIR"

// DefaultCacheDir is where downloaded and extracted inputs (kernel packages)
// are kept between builds: $VMGRID_CACHE_DIR, else $XDG_CACHE_HOME/vmgrid
// (or ~/.cache/vmgrid), else /var/cache/vmgrid.
func DefaultCacheDir() string {
	if d := os.Getenv(CacheDirEnv); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "vmgrid")
	}
	return "/var/cache/vmgrid"
}

// lockFile takes an exclusive flock on path (created if missing), polling so
// that ctx can cancel the wait. The lock serialises builders in different
// processes; within one process it works as well because every call opens its
// own file description.
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() {
				_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for lock %s: %w", path, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// publishDir renames the finished directory tmp to final. A reader never sees
// a half-built final directory: it either does not exist or is complete.
func publishDir(tmp, final string) error {
	if err := os.Rename(tmp, final); err != nil {
		if _, statErr := os.Stat(final); statErr == nil {
			// Someone else published first (only possible without the lock,
			// e.g. a cache shared over NFS); theirs is as good as ours.
			return os.RemoveAll(tmp)
		}
		return err
	}
	return nil
}
