package clonebench

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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

// nbdActivate hands qemu-nbd the listening socket as fd 3 by systemd socket
// activation. LISTEN_PID must be qemu-nbd's own pid, which only the shell
// that execs it knows.
const nbdActivate = `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"`

// startNBD runs qemu-nbd on a socket this process has bound already, so no
// other process can take the port between choosing it and qemu-nbd's bind
// (which is how a port picked free and then closed once made the NBD row
// dial somebody else's server), and waits for qemu-nbd's handshake on it.
func startNBD(ctx context.Context, disk, logDir string) (*nbdServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	lf, err := ln.(*net.TCPListener).File()
	addr := ln.Addr().String()
	ln.Close() // the duplicate in lf keeps the socket listening
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	// -f raw: no format probing (and no warning about it); -e: several
	// clients at once, so that qemu-img's probe and QEMU never wait on
	// each other.
	cmd := exec.Command("sh", "-c", nbdActivate, "qemu-nbd",
		"-r", "-t", "-x", nbdExport, "-f", "raw", "-e", "16", disk)
	cmd.ExtraFiles = []*os.File{lf}
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
	s := &nbdServer{cmd: cmd, addr: addr, done: make(chan struct{})}
	go func() { cmd.Wait(); close(s.done) }() //nolint:errcheck // killed on purpose
	hello := make(chan error, 1)
	go func() { hello <- nbdHello(s.addr, 15*time.Second) }()
	select {
	case err := <-hello:
		if err == nil {
			return s, nil
		}
		s.Close()
		b, _ := os.ReadFile(logf.Name())
		return nil, fmt.Errorf("qemu-nbd on %s: %w: %s", s.addr, err, b)
	case <-s.done:
		b, _ := os.ReadFile(logf.Name())
		return nil, fmt.Errorf("qemu-nbd exited: %s", b)
	case <-ctx.Done():
		s.Close()
		return nil, ctx.Err()
	}
}

// nbdHello reads the server's greeting, the 8 bytes "NBDMAGIC".
func nbdHello(addr string, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(timeout)) //nolint:errcheck // a fresh conn
	magic := make([]byte, 8)
	if _, err := io.ReadFull(c, magic); err != nil {
		return fmt.Errorf("no NBD greeting: %w", err)
	}
	if string(magic) != "NBDMAGIC" {
		return fmt.Errorf("not an NBD server: greeting %q", magic)
	}
	return nil
}

// Close kills qemu-nbd and waits for it.
func (s *nbdServer) Close() {
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL) //nolint:errcheck // gone already is fine
	<-s.done
}
