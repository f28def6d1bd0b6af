package agent

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
)

// Stream is a command started with ExecStream: its output arrives as
// responses (Recv) while input goes to it (Stdin, CloseStdin, Resize,
// Signal).
type Stream struct {
	c    *Client
	id   uint64
	w    *waiter
	once sync.Once
	done atomic.Bool // the last response was received
}

// ExecStream starts req (Argv, Env, Dir, TTY, Rows, Cols) as a stream.
func (c *Client) ExecStream(req Request) (*Stream, error) {
	req.Op = OpExecStream
	w, err := c.send(&req, streamBuffer)
	if err != nil {
		return nil, err
	}
	return &Stream{c: c, id: req.ID, w: w}, nil
}

// Recv returns the next response: Data on FD 1 or 2 while More is set,
// then the last one (ExitCode, Error). After the last, Recv must not be
// called again.
func (s *Stream) Recv(ctx context.Context) (*Response, error) {
	select {
	case r := <-s.w.ch:
		s.done.Store(!r.More)
		return r, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-s.c.done:
		select {
		case r := <-s.w.ch:
			s.done.Store(!r.More)
			return r, nil
		default:
			return nil, s.c.closedErr()
		}
	}
}

func (s *Stream) input(req Request) error {
	req.Op, req.Stream = OpInput, s.id
	if err := s.c.write(&req); err != nil {
		return fmt.Errorf("agent: %w: %w", ErrClosed, err)
	}
	return nil
}

// Stdin sends bytes to the command's standard input (its terminal).
func (s *Stream) Stdin(b []byte) error { return s.input(Request{Data: b}) }

// CloseStdin ends the command's input (on a terminal: end of file).
func (s *Stream) CloseStdin() error { return s.input(Request{EOF: true}) }

// Resize sets the window size of the command's terminal.
func (s *Stream) Resize(rows, cols uint16) error { return s.input(Request{Rows: rows, Cols: cols}) }

// Signal sends sig to the command's process group.
func (s *Stream) Signal(sig syscall.Signal) error { return s.input(Request{Signal: int(sig)}) }

// Close stops waiting for the stream; a command still running is killed.
func (s *Stream) Close() {
	s.once.Do(func() {
		if !s.done.Load() {
			_ = s.Signal(syscall.SIGKILL)
		}
		s.c.forget(s.id, s.w)
	})
}
