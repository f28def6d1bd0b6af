package computeserver

import (
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// The access streams (access.proto): the gRPC side of plant/access.go.

// errNoStart answers a stream whose first message is not its start.
func errNoStart(what string) error {
	return fmt.Errorf("the first message of a %s stream must be start: %w", what, errdefs.ErrInvalidArgument)
}

// ExecStream relays a command's input and output between the caller and
// the guest agent; it ends with the command's exit.
func (s *plantService) ExecStream(stream computev1.PlantService_ExecStreamServer) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	start := first.GetStart()
	if start == nil {
		return errNoStart("exec")
	}
	a, st, err := s.p.ExecStream(stream.Context(), start)
	if err != nil {
		return err
	}
	defer a.Close()
	defer st.Close()
	go execInput(stream, st)
	for {
		r, err := st.Recv(a.Ctx)
		if err != nil {
			// The VM went away (or the agent did): the stream still ends
			// with an exit, so the caller sees why.
			why := "the VM went away"
			if errors.Is(err, agent.ErrClosed) {
				why = "the guest agent went away"
			}
			return stream.Send(&computev1.ExecStreamResponse{Kind: &computev1.ExecStreamResponse_Exit{Exit: &computev1.ExecExit{ExitCode: -1, Error: why}}})
		}
		if err := stream.Send(execOutput(r)); err != nil || !r.More {
			return err
		}
	}
}

// execInput forwards the caller's input until the caller stops sending.
func execInput(stream computev1.PlantService_ExecStreamServer, st *agent.Stream) {
	for {
		m, err := stream.Recv()
		if err != nil {
			return
		}
		switch k := m.Kind.(type) {
		case *computev1.ExecStreamRequest_Stdin:
			err = st.Stdin(k.Stdin)
		case *computev1.ExecStreamRequest_StdinClose:
			err = st.CloseStdin()
		case *computev1.ExecStreamRequest_Resize:
			err = st.Resize(uint16(k.Resize.Rows), uint16(k.Resize.Cols))
		case *computev1.ExecStreamRequest_Signal:
			err = st.Signal(syscall.Signal(k.Signal))
		}
		if err != nil {
			return
		}
	}
}

func execOutput(r *agent.Response) *computev1.ExecStreamResponse {
	switch {
	case !r.More:
		return &computev1.ExecStreamResponse{Kind: &computev1.ExecStreamResponse_Exit{Exit: &computev1.ExecExit{ExitCode: int32(r.ExitCode), Error: r.Error}}}
	case r.FD == 2:
		return &computev1.ExecStreamResponse{Kind: &computev1.ExecStreamResponse_Stderr{Stderr: r.Data}}
	default:
		return &computev1.ExecStreamResponse{Kind: &computev1.ExecStreamResponse_Stdout{Stdout: r.Data}}
	}
}

// Console relays the serial console both ways until either side goes.
func (s *plantService) Console(stream computev1.PlantService_ConsoleServer) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	start := first.GetStart()
	if start == nil {
		return errNoStart("console")
	}
	a, conn, tail, err := s.p.Console(stream.Context(), start.VmId, int(start.TailBytes))
	if err != nil {
		return err
	}
	defer a.Close()
	if len(tail) > 0 {
		if err := stream.Send(&computev1.ConsoleResponse{Output: tail}); err != nil {
			return err
		}
	}
	go func() {
		defer a.Close() // the caller detached
		for {
			m, err := stream.Recv()
			if err != nil {
				return
			}
			if _, err := conn.Write(m.GetInput()); err != nil {
				return
			}
		}
	}()
	return copyConn(conn, func(b []byte) error { return stream.Send(&computev1.ConsoleResponse{Output: b}) })
}

// PortForward relays a TCP connection to a port of the guest.
func (s *plantService) PortForward(stream computev1.PlantService_PortForwardServer) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	start := first.GetStart()
	if start == nil {
		return errNoStart("port-forward")
	}
	a, conn, err := s.p.PortForward(stream.Context(), start.VmId, int(start.Port))
	if err != nil {
		return err
	}
	defer a.Close()
	if err := stream.Send(&computev1.PortForwardResponse{Connected: true}); err != nil {
		return err
	}
	go forwardInput(stream, conn, a.Close)
	return copyConn(conn, func(b []byte) error { return stream.Send(&computev1.PortForwardResponse{Data: b}) })
}

// forwardInput writes the caller's bytes to the guest; close_write or the
// caller's half-close shuts the connection's write side, an error ends it.
func forwardInput(stream computev1.PlantService_PortForwardServer, conn net.Conn, end func()) {
	for {
		m, err := stream.Recv()
		if err == io.EOF || m.GetCloseWrite() {
			if cw, ok := conn.(interface{ CloseWrite() error }); ok {
				_ = cw.CloseWrite()
			}
			return
		}
		if err != nil {
			end()
			return
		}
		if _, err := conn.Write(m.GetData()); err != nil {
			end()
			return
		}
	}
}

// copyConn sends what conn yields until it ends; a connection closed by
// the stream's end (the VM went, the caller left) ends it cleanly.
func copyConn(conn net.Conn, send func([]byte) error) error {
	buf := make([]byte, 32<<10)
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			if serr := send(buf[:n]); serr != nil {
				return serr
			}
		}
		if err != nil {
			return nil
		}
	}
}
