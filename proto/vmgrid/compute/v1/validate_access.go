package computev1

import (
	"errors"
	"fmt"
	"strings"
)

// Limits of the access streams (access.proto).
const (
	MaxStreamChunk   = 1 << 20 // bytes of one stdin, input or data message
	MaxExecArgs      = 256
	MaxExecArgvBytes = 1 << 20
	MaxTerminalSide  = 1000
	MaxConsoleTail   = 1 << 20
)

func validateChunk(field string, b []byte) error {
	if len(b) > MaxStreamChunk {
		return fmt.Errorf("%s: %d bytes; at most %d in one message", field, len(b), MaxStreamChunk)
	}
	return nil
}

func validateTerminalSize(field string, s *TerminalSize) error {
	if s == nil {
		return nil
	}
	if s.Rows < 1 || s.Rows > MaxTerminalSide || s.Cols < 1 || s.Cols > MaxTerminalSide {
		return fmt.Errorf("%s: %dx%d; rows and cols are 1 to %d", field, s.Rows, s.Cols, MaxTerminalSide)
	}
	return nil
}

// Validate checks the start of an exec stream.
func (s *ExecStart) Validate() error {
	if err := validateVMID(s.VmId, true); err != nil {
		return err
	}
	if len(s.Argv) == 0 || s.Argv[0] == "" {
		return errors.New("start.argv: a command is required")
	}
	if len(s.Argv) > MaxExecArgs {
		return fmt.Errorf("start.argv: %d arguments; at most %d", len(s.Argv), MaxExecArgs)
	}
	n := 0
	for _, a := range append(append([]string{}, s.Argv...), s.Env...) {
		n += len(a)
	}
	if n > MaxExecArgvBytes {
		return fmt.Errorf("start.argv: %d bytes with env; at most %d", n, MaxExecArgvBytes)
	}
	for _, e := range s.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return fmt.Errorf("start.env %.40q: KEY=VALUE", e)
		}
	}
	return validateTerminalSize("start.size", s.Size)
}

// Validate checks one message of an exec stream.
func (r *ExecStreamRequest) Validate() error {
	switch k := r.Kind.(type) {
	case *ExecStreamRequest_Start:
		if k.Start == nil {
			return errors.New("start: vm_id and argv are required")
		}
		return k.Start.Validate()
	case *ExecStreamRequest_Stdin:
		return validateChunk("stdin", k.Stdin)
	case *ExecStreamRequest_Resize:
		if k.Resize == nil {
			return errors.New("resize: rows and cols are required")
		}
		return validateTerminalSize("resize", k.Resize)
	case *ExecStreamRequest_Signal:
		if k.Signal < 1 || k.Signal > 64 {
			return fmt.Errorf("signal %d: a signal number is 1 to 64", k.Signal)
		}
	case *ExecStreamRequest_StdinClose:
	default:
		return errors.New("kind: one of start, stdin, stdin_close, resize, signal is required")
	}
	return nil
}

// Validate checks one message of a console stream.
func (r *ConsoleRequest) Validate() error {
	switch k := r.Kind.(type) {
	case *ConsoleRequest_Start:
		if k.Start == nil {
			return errors.New("start: vm_id is required")
		}
		if k.Start.TailBytes > MaxConsoleTail {
			return fmt.Errorf("start.tail_bytes %d: at most %d", k.Start.TailBytes, MaxConsoleTail)
		}
		return validateVMID(k.Start.VmId, true)
	case *ConsoleRequest_Input:
		return validateChunk("input", k.Input)
	default:
		return errors.New("kind: one of start, input is required")
	}
}

// Validate checks one message of a port-forward stream.
func (r *PortForwardRequest) Validate() error {
	switch k := r.Kind.(type) {
	case *PortForwardRequest_Start:
		if k.Start == nil {
			return errors.New("start: vm_id and port are required")
		}
		if k.Start.Port < 1 || k.Start.Port > 65535 {
			return fmt.Errorf("start.port %d: 1 to 65535", k.Start.Port)
		}
		return validateVMID(k.Start.VmId, true)
	case *PortForwardRequest_Data:
		return validateChunk("data", k.Data)
	case *PortForwardRequest_CloseWrite:
	default:
		return errors.New("kind: one of start, data, close_write is required")
	}
	return nil
}
