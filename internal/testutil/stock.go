package testutil

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/imagebuild"
)

// StockImage returns the project-made "stock" qcow2 (imagebuild.Stock: a
// Debian cloud disk with cloud-init and qemu-ga, booted from firmware),
// built once into $VMGRID_CACHE_DIR (imagebuild.DefaultCacheDir) and
// reused by every later test and process: Stock.Build takes a file lock,
// so tests of one CI run that ask at once build it once. Needs root
// (debootstrap) and the tools of deploy/packages.txt.
func StockImage(tb testing.TB) string {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("building the stock image runs debootstrap: needs root")
	}
	for _, bin := range []string{"debootstrap", "mkfs.vfat", "mcopy", "syslinux", "sfdisk", "xorriso"} {
		if _, err := exec.LookPath(bin); err != nil {
			tb.Skipf("%s is not installed (deploy/setup.sh installs deploy/packages.txt)", bin)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	start := time.Now()
	p, err := (&imagebuild.Stock{}).Build(ctx)
	if err != nil {
		tb.Fatalf("build the stock image: %v", err)
	}
	tb.Logf("stock image %s ready in %s", p, time.Since(start).Round(time.Millisecond))
	return p
}
