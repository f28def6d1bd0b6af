package vmm

import (
	"fmt"
	"os/exec"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// QEMU advises MADV_HUGEPAGE on all guest RAM. On a RAM file mapped
// privately from the FUSE view (a lazy restore) that advice makes every
// first touch of a page read a 2 MiB-aligned 4 MiB window of the file
// (the kernel's mmap read-around for VM_HUGEPAGE ignores the mount's
// read-ahead): measured on the tiny guest, a lazy clone read 95 such
// windows, 67 MB, nearly all of its non-zero RAM, before it was ready.
// startNoTHP starts QEMU with a seccomp filter that makes
// madvise(MADV_HUGEPAGE) a no-op that succeeds, so a fault reads what the
// memory view's read-ahead says. Filters are per thread and inherited by
// the children a thread forks, so the filter goes on a locked thread that
// forks QEMU and then stays until QEMU exits: Pdeathsig fires when the
// forking thread ends, and the thread must not run other goroutines.
func startNoTHP(cmd *exec.Cmd, exited <-chan struct{}) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := denyHugePageAdvice(); err != nil {
			errc <- fmt.Errorf("seccomp filter against MADV_HUGEPAGE: %w", err)
			return
		}
		err := cmd.Start()
		errc <- err
		if err == nil {
			<-exited
		}
	}()
	return <-errc
}

// startQEMU starts the machine's process; one whose RAM is a file mapped
// privately (a lazy restore) without huge-page advice.
func startQEMU(cmd *exec.Cmd, spec Spec, exited <-chan struct{}) error {
	if spec.MemoryFile != nil && !spec.MemoryFile.Share {
		return startNoTHP(cmd, exited)
	}
	return cmd.Start()
}

// Offsets in struct seccomp_data.
const (
	seccompNr   = 0
	seccompArch = 4
	seccompArg2 = 16 + 2*8 // args[2], low 32 bits (little endian)
)

func denyHugePageAdvice() error {
	const retSkip = unix.SECCOMP_RET_ERRNO | 0 // the call is skipped and returns 0
	prog := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: seccompArch},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 5, K: unix.AUDIT_ARCH_X86_64},
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: seccompNr},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 3, K: unix.SYS_MADVISE},
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: seccompArg2},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 1, K: unix.MADV_HUGEPAGE},
		{Code: unix.BPF_RET | unix.BPF_K, K: retSkip},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW},
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	return unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, uintptr(unsafe.Pointer(&fprog)), 0, 0)
}
