package vmm

import (
	"context"
	"os"
	"strings"
	"time"
)

// KVMWorks reports whether a guest really runs under KVM here: it boots
// kernel with -accel kvm and no root disk, and says yes only if the kernel
// gets as far as its "cannot mount root" panic (QEMU then exits, panic=-1
// and -no-reboot) within timeout (0 means 5 s; under KVM that takes well
// under a second). An existing /dev/kvm is not enough: on nested hosts like
// the project's machines, guests hang on it without a word. A false answer
// costs the timeout, so probe once per process and keep the answer.
func KVMWorks(ctx context.Context, d *QEMU, kernel string, timeout time.Duration) bool {
	if timeout == 0 {
		timeout = 5 * time.Second
	}
	if _, err := os.Stat("/dev/kvm"); err != nil || kernel == "" {
		return false
	}
	dir, err := os.MkdirTemp("", "vmgrid-kvm-")
	if err != nil {
		return false
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	m, err := d.Start(ctx, Spec{
		Name:      "kvm-probe",
		Dir:       dir,
		Accel:     "kvm",
		MemoryMiB: 128,
		Kernel:    kernel,
		Append:    "console=ttyS0 panic=-1",
	})
	if err != nil {
		return false
	}
	defer m.Kill()
	select {
	case <-m.Exited():
		return strings.Contains(m.ConsoleLog(), "Kernel panic")
	case <-ctx.Done():
		return false
	}
}

// DetectAccel returns "kvm" if KVMWorks, else "tcg".
func DetectAccel(ctx context.Context, d *QEMU, kernel string) string {
	if KVMWorks(ctx, d, kernel, 0) {
		return "kvm"
	}
	return "tcg"
}
