package clonebench

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// nbdServer is qemu-nbd serving the golden root disk on the image side,
// read-only and persistent (it outlives its clients), as export "golden".
type nbdServer struct {
	cmd  *exec.Cmd
	addr string
	done chan struct{}
}

const nbdExport = "golden"

func startNBD(ctx context.Context, disk, logDir string) (*nbdServer, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	// -f raw: no format probing (and no warning about it); -e: several
	// clients at once, so that qemu-img's probe and QEMU never wait on
	// each other.
	cmd := exec.Command("qemu-nbd", "-r", "-t", "-x", nbdExport, "-f", "raw", "-e", "16",
		"-b", "127.0.0.1", "-p", strconv.Itoa(port), disk)
	logf, err := os.Create(filepath.Join(logDir, "qemu-nbd.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemu-nbd: %w", err)
	}
	s := &nbdServer{cmd: cmd, addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), done: make(chan struct{})}
	go func() { cmd.Wait(); close(s.done) }() //nolint:errcheck // killed on purpose
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", s.addr, time.Second)
		if err == nil {
			c.Close()
			return s, nil
		}
		select {
		case <-s.done:
			b, _ := os.ReadFile(logf.Name())
			return nil, fmt.Errorf("qemu-nbd exited: %s", b)
		case <-ctx.Done():
			s.Close()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Close()
			return nil, fmt.Errorf("qemu-nbd did not listen on %s", s.addr)
		}
	}
}

// Close kills qemu-nbd and waits for it.
func (s *nbdServer) Close() {
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL) //nolint:errcheck // gone already is fine
	<-s.done
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}
