package fuseview_test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/gvfs/internal/gvfstest"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/gvfs/fuseview"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
)

// The crash tests run a compute server's view in a child process (this
// test binary run again), which starts a grandchild as a compute server
// starts QEMU, and kill -9 the child.

const (
	childEnv    = "FUSEVIEW_TEST_CHILD" // "open" or "leak"
	upstreamEnv = "FUSEVIEW_TEST_UPSTREAM"
	cacheEnv    = "FUSEVIEW_TEST_CACHE"
	mntEnv      = "FUSEVIEW_TEST_MNT"
)

// childMain mounts a view and starts `sleep 300` holding MNT/img/disk.raw
// open on its stdin ("open"), or holding a copy of the view's /dev/fuse
// descriptor, as every QEMU did when go-fuse leaked it ("leak"). It prints
// the grandchild's pid and waits to be killed.
func childMain(mode string) {
	die := func(err error) { fmt.Println("error:", err); os.Exit(1) }
	up, err := gvfs.DialUpstream(os.Getenv(upstreamEnv), services.TLSFiles{}, false)
	if err != nil {
		die(err)
	}
	p, err := gvfs.New(gvfs.Config{Upstream: up, Dir: os.Getenv(cacheEnv), Cache: gvfs.CacheConfig{Capacity: 64 << 20}, FlushIdle: -1, Logger: zap.NewNop()})
	if err != nil {
		die(err)
	}
	mnt := os.Getenv(mntEnv)
	if _, err := fuseview.Mount(mnt, p, fuseview.MountOptions{}); err != nil {
		die(err)
	}
	cmd := exec.Command("sh", "-c", "exec sleep 300")
	switch mode {
	case "open":
		f, err := os.Open(filepath.Join(mnt, "img", "disk.raw"))
		if err != nil {
			die(err)
		}
		cmd.Stdin = f
	case "leak":
		fds, err := fuseFDs(os.Getpid())
		if err != nil || len(fds) == 0 {
			die(fmt.Errorf("no /dev/fuse descriptor (%v)", err))
		}
		cmd.ExtraFiles = []*os.File{os.NewFile(uintptr(fds[0]), "/dev/fuse")}
	}
	if err := cmd.Start(); err != nil {
		die(err)
	}
	// The child holds no file of its own view: a process killed while it
	// does waits for ever on itself to answer the file's FLUSH.
	if f, ok := cmd.Stdin.(*os.File); ok {
		f.Close()
	}
	fmt.Println("ready", cmd.Process.Pid)
	select {}
}

// fuseFDs lists the /dev/fuse descriptors of process pid.
func fuseFDs(pid int) ([]int, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []int
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && target == "/dev/fuse" {
			fd, _ := strconv.Atoi(e.Name())
			out = append(out, fd)
		}
	}
	return out, nil
}

type crashFixture struct {
	srv      *testutil.Server
	ref      []byte
	mnt      string
	child    *exec.Cmd
	grandPID int
}

// startChild publishes img and starts a child serving its view on a new
// mountpoint; the grandchild is killed and any mount left is cleared when
// the test ends.
func startChild(t *testing.T, mode string) *crashFixture {
	t.Helper()
	fx := &crashFixture{srv: testutil.StartServer(t, ""), mnt: filepath.Join(t.TempDir(), "mnt")}
	fx.ref = gvfstest.SparseData(rand.New(rand.NewPCG(15, 4)), 1<<20, 8, 64<<10)
	gvfstest.Publish(t, fx.srv.Client, "img", gvfstest.GoldenFile{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: fx.ref})
	hadFusectl := fuseview.FusectlMounted()
	t.Cleanup(func() {
		if err := fuseview.ClearDeadMount(fx.mnt, zap.NewNop()); err != nil {
			t.Errorf("clear %s: %v", fx.mnt, err)
		}
		if !hadFusectl && fuseview.FusectlMounted() {
			_ = syscall.Unmount(fuseview.ConnectionsDir, 0)
		}
	})
	fx.child = exec.Command(os.Args[0], "-test.run=^$")
	fx.child.Env = append(os.Environ(), childEnv+"="+mode, upstreamEnv+"="+fx.srv.Srv.Addr(), cacheEnv+"="+t.TempDir(), mntEnv+"="+fx.mnt)
	fx.child.Stderr = os.Stderr
	out, err := fx.child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := fx.child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fx.child.Process.Kill(); _ = fx.child.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	if _, err := fmt.Sscanf(line, "ready %d", &fx.grandPID); err != nil {
		t.Fatalf("child: %q", line)
	}
	t.Cleanup(func() { _ = syscall.Kill(fx.grandPID, syscall.SIGKILL) })
	return fx
}

// kill9 kills the child and waits for it.
func (fx *crashFixture) kill9(t *testing.T) {
	t.Helper()
	if err := fx.child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = fx.child.Wait()
}

// killGrandchild kills the grandchild and fails unless it is dead (gone or
// a zombie) within 10 s.
func (fx *crashFixture) killGrandchild(t *testing.T) {
	t.Helper()
	if err := syscall.Kill(fx.grandPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", fx.grandPID))
		if err != nil {
			return // gone
		}
		if f := strings.Fields(string(b)); len(f) > 2 && f[2] == "Z" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the grandchild does not die after kill -9 (/proc/%d/stat: %s)", fx.grandPID, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// remount mounts a new view on the child's mountpoint, failing if that
// takes more than 10 s, and checks the file reads back.
func (fx *crashFixture) remount(t *testing.T) {
	t.Helper()
	p := gvfstest.NewProxy(t, fx.srv.Srv.Addr(), "")
	done := make(chan error, 1)
	go func() {
		_, err := fuseview.Mount(fx.mnt, p, fuseview.MountOptions{})
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		// Unblock the mount before failing: the cleanup would hang too.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		abortAll(ctx)
		t.Fatal("mounting over the dead view did not finish within 10s")
	}
	got, err := os.ReadFile(filepath.Join(fx.mnt, "img", "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	gvfstest.SameBytes(t, "after remount", got, fx.ref)
}

// abortAll aborts every FUSE connection of a mount named vmgrid (only
// when a test already failed, to let its cleanup finish).
func abortAll(ctx context.Context) {
	ents, _ := os.ReadDir(fuseview.ConnectionsDir)
	for _, e := range ents {
		if ctx.Err() != nil {
			return
		}
		_ = os.WriteFile(filepath.Join(fuseview.ConnectionsDir, e.Name(), "abort"), []byte("1"), 0o200)
	}
}

// TestChildrenDoNotHoldTheConnection: a process the compute server starts
// inherits no /dev/fuse descriptor, so after kill -9 of the compute server
// its file on the view fails instead of hanging: kill -9 ends it, and a new
// view mounts on the same mountpoint at once.
func TestChildrenDoNotHoldTheConnection(t *testing.T) {
	fx := startChild(t, "open")
	if fds, err := fuseFDs(fx.grandPID); err != nil || len(fds) != 0 {
		t.Fatalf("the grandchild holds /dev/fuse descriptors %v (%v)", fds, err)
	}
	fx.kill9(t)
	fx.killGrandchild(t)
	fx.remount(t)
}

// TestRemountAbortsDeadConnection: when the connection of a dead compute
// server lives on in a process that holds its descriptor (QEMUs started
// before this fix), a new view still mounts at once: the dead connection
// is aborted, not statfs'd.
func TestRemountAbortsDeadConnection(t *testing.T) {
	fx := startChild(t, "leak")
	if fds, err := fuseFDs(fx.grandPID); err != nil || len(fds) == 0 {
		t.Fatalf("the leak was not simulated: grandchild descriptors %v (%v)", fds, err)
	}
	fx.kill9(t)
	fx.remount(t)
	fx.killGrandchild(t)
}
