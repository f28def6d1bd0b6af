package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
)

// Limits of the guest side of streams.
const (
	maxStreams = 64
	// chunkSize is the most output one response carries.
	chunkSize = 32 << 10
	// drainAfterExit is how long output is still read after the command
	// exited: a daemon it left behind may hold its stdout open forever.
	drainAfterExit = time.Second
	// inputQueue is how many input messages wait for a command that does
	// not read them before the agent's reader waits too.
	inputQueue = 64
)

// encoder writes responses from several goroutines, one line at a time.
type encoder struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (e *encoder) send(r *Response) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.enc.Encode(r)
}

// streams are the exec streams of one connection.
type streams struct {
	ctx context.Context // ends with the connection: its commands are killed
	out *encoder
	mu  sync.Mutex
	m   map[uint64]*session
	wg  sync.WaitGroup
}

// session is one running exec stream.
type session struct {
	in   chan Request  // input for the command, in order
	done chan struct{} // closed when the command's exit was sent
	cmd  *exec.Cmd
	pty  *os.File // the terminal's master; nil without a terminal
}

// take handles req if it is a stream operation, reporting whether it was.
func (ss *streams) take(req *Request) bool {
	switch req.Op {
	case OpExecStream:
		if err := ss.start(req); err != nil {
			_ = ss.out.send(&Response{ID: req.ID, Error: err.Error(), ExitCode: -1})
		}
	case OpInput:
		ss.mu.Lock()
		s := ss.m[req.Stream]
		ss.mu.Unlock()
		if s != nil {
			select {
			case s.in <- *req:
			case <-s.done:
			case <-ss.ctx.Done():
			}
		}
	default:
		return false
	}
	return true
}

// start runs the command of req and registers its session before the next
// request is read, so input that follows at once finds it.
func (ss *streams) start(req *Request) error {
	if len(req.Argv) == 0 {
		return errors.New("exec needs a command")
	}
	ss.mu.Lock()
	n := len(ss.m)
	ss.mu.Unlock()
	if n >= maxStreams {
		return fmt.Errorf("%d streams are open already", maxStreams)
	}
	cmd := exec.Command(req.Argv[0], req.Argv[1:]...)
	cmd.Env = append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"}, req.Env...)
	cmd.Dir = req.Dir
	s := &session{in: make(chan Request, inputQueue), done: make(chan struct{}), cmd: cmd}
	outputs, err := s.startCommand(req)
	if err != nil {
		return err
	}
	ss.mu.Lock()
	ss.m[req.ID] = s
	ss.mu.Unlock()
	ss.wg.Add(2)
	go func() { defer ss.wg.Done(); s.feed(ss.ctx) }()
	go func() { defer ss.wg.Done(); ss.run(req.ID, s, outputs) }()
	return nil
}

// startCommand starts the command on a terminal or on pipes and returns
// what its output is read from, by FD.
func (s *session) startCommand(req *Request) (map[int]*os.File, error) {
	if req.TTY {
		if req.Rows == 0 || req.Cols == 0 {
			req.Rows, req.Cols = 24, 80
		}
		f, err := pty.StartWithSize(s.cmd, &pty.Winsize{Rows: req.Rows, Cols: req.Cols})
		if err != nil {
			return nil, err
		}
		s.pty = f
		return map[int]*os.File{1: f}, nil
	}
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	files, err := pipes(s.cmd)
	if err != nil {
		return nil, err
	}
	return files, nil
}

// pipes starts cmd with pipes for its stdin, stdout and stderr and returns
// the read ends of the latter by FD.
func pipes(cmd *exec.Cmd) (map[int]*os.File, error) {
	var parent, child []*os.File
	closeAll := func(fs []*os.File) {
		for _, f := range fs {
			f.Close()
		}
	}
	for i := 0; i < 3; i++ {
		r, w, err := os.Pipe()
		if err != nil {
			closeAll(parent)
			closeAll(child)
			return nil, err
		}
		if i == 0 {
			parent, child = append(parent, w), append(child, r)
		} else {
			parent, child = append(parent, r), append(child, w)
		}
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = child[0], child[1], child[2]
	err := cmd.Start()
	closeAll(child) // the command has its copies
	if err != nil {
		closeAll(parent)
		return nil, err
	}
	cmd.Stdin = parent[0] // kept for feed: the write end of stdin
	return map[int]*os.File{1: parent[1], 2: parent[2]}, nil
}

// stdin is where input goes: the terminal or the stdin pipe.
func (s *session) stdin() *os.File {
	if s.pty != nil {
		return s.pty
	}
	return s.cmd.Stdin.(*os.File)
}

// feed applies input in order until the session ends.
func (s *session) feed(ctx context.Context) {
	for {
		select {
		case req := <-s.in:
			s.apply(&req)
		case <-s.done:
			return
		case <-ctx.Done():
			return
		}
	}
}

func (s *session) apply(req *Request) {
	switch {
	case len(req.Data) > 0:
		_, _ = s.stdin().Write(req.Data)
	case req.EOF && s.pty != nil:
		_, _ = s.pty.Write([]byte{4}) // ^D: end of file on a terminal
	case req.EOF:
		s.stdin().Close()
	case req.Signal != 0 && s.cmd.Process != nil:
		// The terminal's session leader's group, or the pipes' group.
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.Signal(req.Signal))
	case req.Rows > 0 && req.Cols > 0 && s.pty != nil:
		_ = pty.Setsize(s.pty, &pty.Winsize{Rows: req.Rows, Cols: req.Cols})
	}
}

// run streams the command's output until it exits (or the connection
// goes), then sends its exit.
func (ss *streams) run(id uint64, s *session, outputs map[int]*os.File) {
	var readers sync.WaitGroup
	for fd, f := range outputs {
		readers.Add(1)
		go func() { defer readers.Done(); ss.copyOut(id, fd, f) }()
	}
	exited := make(chan error, 1)
	go func() { exited <- s.cmd.Wait() }()
	var err error
	select {
	case err = <-exited:
	case <-ss.ctx.Done():
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		err = <-exited
	}
	drained := make(chan struct{})
	go func() { readers.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(drainAfterExit):
	}
	for _, f := range outputs {
		f.Close() // ends readers still waiting on a leftover writer
	}
	<-drained
	ss.mu.Lock()
	delete(ss.m, id)
	ss.mu.Unlock()
	_ = ss.out.send(exitResponse(id, err))
	close(s.done) // feed ends; take drops input for a gone stream
	if s.pty == nil {
		s.stdin().Close()
	}
}

// copyOut sends what f yields as responses on fd.
func (ss *streams) copyOut(id uint64, fd int, f *os.File) {
	buf := make([]byte, chunkSize)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			if ss.out.send(&Response{ID: id, More: true, FD: fd, Data: buf[:n]}) != nil {
				return
			}
		}
		if err != nil {
			return // EOF, or EIO from a terminal whose command is gone
		}
	}
}

func exitResponse(id uint64, err error) *Response {
	resp := &Response{ID: id}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		resp.ExitCode = exit.ExitCode()
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			resp.Error = "killed by signal " + ws.Signal().String()
		}
	case err != nil && !errors.Is(err, io.EOF):
		resp.Error, resp.ExitCode = err.Error(), -1
	}
	return resp
}
