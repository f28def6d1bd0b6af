package qemuga

import (
	"context"
	"fmt"
	"time"
)

// Command is a program for Exec.
type Command struct {
	Path  string   // absolute, or found in the guest agent's PATH
	Args  []string // without Path
	Env   []string // KEY=VALUE; qemu-ga starts the program with these only
	Stdin []byte
}

// ExecResult is how a program ended and what it wrote (qemu-ga keeps a
// bounded amount of output: Truncated says it dropped some).
type ExecResult struct {
	ExitCode  int
	Signal    int
	Stdout    []byte
	Stderr    []byte
	Truncated bool
}

type execStatus struct {
	Exited       bool   `json:"exited"`
	ExitCode     int    `json:"exitcode"`
	Signal       int    `json:"signal"`
	OutData      []byte `json:"out-data"` // base64 in JSON, as []byte is
	ErrData      []byte `json:"err-data"`
	OutTruncated bool   `json:"out-truncated"`
	ErrTruncated bool   `json:"err-truncated"`
}

// Exec runs a program in the guest and waits for it to end (guest-exec,
// then guest-exec-status until it has exited). When ctx ends first the
// program keeps running in the guest: qemu-ga cannot kill it.
func (c *Client) Exec(ctx context.Context, cmd Command) (*ExecResult, error) {
	args := map[string]any{"path": cmd.Path, "arg": cmd.Args, "capture-output": true}
	if cmd.Args == nil {
		args["arg"] = []string{}
	}
	if len(cmd.Env) > 0 {
		args["env"] = cmd.Env
	}
	if len(cmd.Stdin) > 0 {
		args["input-data"] = cmd.Stdin
	}
	var started struct {
		PID int `json:"pid"`
	}
	if err := c.Call(ctx, "guest-exec", args, &started); err != nil {
		return nil, err
	}
	wait := 10 * time.Millisecond
	for {
		var st execStatus
		if err := c.Call(ctx, "guest-exec-status", map[string]any{"pid": started.PID}, &st); err != nil {
			return nil, err
		}
		if st.Exited {
			return &ExecResult{ExitCode: st.ExitCode, Signal: st.Signal, Stdout: st.OutData, Stderr: st.ErrData, Truncated: st.OutTruncated || st.ErrTruncated}, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("qemu-ga: %s (pid %d) still running: %w", cmd.Path, started.PID, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(2*wait, 250*time.Millisecond)
	}
}
