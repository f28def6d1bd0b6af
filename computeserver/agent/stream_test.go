package agent

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"
)

// collect reads a stream to its end and returns its output by FD and its
// last response.
func collect(t *testing.T, ctx context.Context, s *Stream) (map[int]*bytes.Buffer, *Response) {
	t.Helper()
	out := map[int]*bytes.Buffer{1: {}, 2: {}}
	for {
		r, err := s.Recv(ctx)
		if err != nil {
			t.Fatalf("recv: %v", err)
		}
		if !r.More {
			return out, r
		}
		out[r.FD].Write(r.Data)
	}
}

func TestExecStreamPipesStdinToStdoutAndExitCode(t *testing.T) {
	c := pipeClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := c.ExecStream(Request{Argv: []string{"sh", "-c", "tr a-z A-Z; echo done >&2; exit 7"}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, part := range []string{"hello ", "stream\n"} {
		if err := s.Stdin([]byte(part)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.CloseStdin(); err != nil {
		t.Fatal(err)
	}
	out, last := collect(t, ctx, s)
	if got := out[1].String(); got != "HELLO STREAM\n" {
		t.Fatalf("stdout %q", got)
	}
	if got := out[2].String(); got != "done\n" {
		t.Fatalf("stderr %q", got)
	}
	if last.ExitCode != 7 || last.Error != "" {
		t.Fatalf("exit %d error %q", last.ExitCode, last.Error)
	}
}

func TestExecStreamTerminal(t *testing.T) {
	c := pipeClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := c.ExecStream(Request{Argv: []string{"sh", "-c", "stty size; read line; echo got:$line"}, TTY: true, Rows: 33, Cols: 101})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Stdin([]byte("typed\r")); err != nil {
		t.Fatal(err)
	}
	out, last := collect(t, ctx, s)
	got := out[1].String()
	if !strings.Contains(got, "33 101") || !strings.Contains(got, "got:typed") {
		t.Fatalf("terminal output %q", got)
	}
	if last.ExitCode != 0 {
		t.Fatalf("exit %d %q", last.ExitCode, last.Error)
	}
}

// A long command in one stream holds up neither other streams nor
// ordinary requests, and a signal ends it.
func TestExecStreamsRunBesideRequestsAndSignals(t *testing.T) {
	c := pipeClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	long, err := c.ExecStream(Request{Argv: []string{"sleep", "30"}})
	if err != nil {
		t.Fatal(err)
	}
	defer long.Close()
	if resp, err := c.Do(ctx, Request{Op: OpExec, Argv: []string{"echo", "beside"}}); err != nil || string(resp.Stdout) != "beside\n" {
		t.Fatalf("exec beside a stream: %v %+v", err, resp)
	}
	if err := long.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	_, last := collect(t, ctx, long)
	if !strings.Contains(last.Error, "signal") {
		t.Fatalf("want killed by a signal, got %+v", last)
	}
}

func TestExecStreamUnknownCommand(t *testing.T) {
	c := pipeClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := c.ExecStream(Request{Argv: []string{"/no/such/command"}})
	if err != nil {
		t.Fatal(err)
	}
	_, last := collect(t, ctx, s)
	if last.Error == "" || last.ExitCode != -1 {
		t.Fatalf("want an error, got %+v", last)
	}
}

// The connection going away kills the streams' commands.
func TestExecStreamEndsWithConnection(t *testing.T) {
	c := pipeClient(t)
	s, err := c.ExecStream(Request{Argv: []string{"sh", "-c", "echo $$; exec sleep 30"}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := s.Recv(ctx)
	if err != nil || r.FD != 1 {
		t.Fatalf("recv pid: %v %+v", err, r)
	}
	var pid int
	if _, err := fmt.Sscan(strings.TrimSpace(string(r.Data)), &pid); err != nil {
		t.Fatal(err)
	}
	c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("command %d still runs after its connection went", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
