package agent

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// pipeClient serves an agent on one end of a pipe and returns a client on
// the other.
func pipeClient(t *testing.T) *Client {
	t.Helper()
	a, b := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); Serve(ctx, a) }()
	t.Cleanup(func() { cancel(); b.Close(); a.Close(); <-done })
	return newClient(b)
}

func TestExecOutputsExitCodeAndResults(t *testing.T) {
	c := pipeClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := c.Do(ctx, Request{Op: OpExec, Argv: []string{"sh", "-c", `echo out; echo err >&2; echo "answer=$X" > "$VMGRID_RESULTS"; exit 3`}, Env: []string{"X=42"}})
	if err != nil {
		t.Fatal(err)
	}
	if resp.ExitCode != 3 || resp.Error != "" {
		t.Fatalf("exit %d error %q", resp.ExitCode, resp.Error)
	}
	if string(resp.Stdout) != "out\n" || string(resp.Stderr) != "err\n" {
		t.Fatalf("stdout %q stderr %q", resp.Stdout, resp.Stderr)
	}
	if resp.Results["answer"] != "42" {
		t.Fatalf("results %v", resp.Results)
	}
}

func TestExecTimeoutAndMissingCommand(t *testing.T) {
	c := pipeClient(t)
	ctx := context.Background()
	resp, err := c.Do(ctx, Request{Op: OpExec, Argv: []string{"sleep", "10"}, Timeout: Duration(100 * time.Millisecond)})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(resp.Error, "timed out") {
		t.Fatalf("want a timeout, got %+v", resp)
	}
	resp, err = c.Do(ctx, Request{Op: OpExec, Argv: []string{"/no/such/command"}})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Error == "" || resp.ExitCode != -1 {
		t.Fatalf("want an error for a missing command, got %+v", resp)
	}
}

func TestWriteAndReadFile(t *testing.T) {
	c := pipeClient(t)
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "a", "b.txt")
	if resp, err := c.Do(ctx, Request{Op: OpWriteFile, Path: path, Content: []byte("hello"), Mode: 0o600}); err != nil || resp.Error != "" {
		t.Fatalf("write: %v %+v", err, resp)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("stat %v %v", st, err)
	}
	resp, err := c.Do(ctx, Request{Op: OpReadFile, Path: path})
	if err != nil || string(resp.Content) != "hello" {
		t.Fatalf("read: %v %+v", err, resp)
	}
	if resp, _ := c.Do(ctx, Request{Op: OpWriteFile, Path: "relative"}); resp.Error == "" {
		t.Fatal("a relative path must be refused")
	}
}

func TestUnknownOpAndBadJSON(t *testing.T) {
	c := pipeClient(t)
	ctx := context.Background()
	resp, err := c.Do(ctx, Request{Op: "fly"})
	if err != nil || !strings.Contains(resp.Error, "unknown operation") {
		t.Fatalf("%v %+v", err, resp)
	}
	resp, err = c.Do(ctx, Request{Op: OpPing})
	if err != nil || resp.Version != Version {
		t.Fatalf("ping: %v %+v", err, resp)
	}
}

func TestDoHonoursContext(t *testing.T) {
	a, b := net.Pipe() // nobody serves a: the request never gets an answer
	defer a.Close()
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := a.Read(buf); err != nil {
				return
			}
		}
	}()
	c := newClient(b)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := c.Do(ctx, Request{Op: OpPing}); !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrNoAnswer) {
		t.Fatalf("the caller's deadline: %v, want context.DeadlineExceeded", err)
	}

	// A guest that never answers fails the call by itself: its own timeout
	// and the grace, or the bound of requests without one.
	defer func(g, u time.Duration) { answerGrace, untimedBound = g, u }(answerGrace, untimedBound)
	answerGrace, untimedBound = 100*time.Millisecond, 300*time.Millisecond
	for _, tc := range []struct {
		req  Request
		want time.Duration
	}{
		{Request{Op: OpSetTime, Timeout: Duration(200 * time.Millisecond)}, 300 * time.Millisecond},
		{Request{Op: OpPing}, 300 * time.Millisecond},
	} {
		start := time.Now()
		_, err := c.Do(context.Background(), tc.req)
		took := time.Since(start)
		if !errors.Is(err, ErrNoAnswer) || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), tc.req.Op) {
			t.Fatalf("%s unanswered: %v, want ErrNoAnswer naming the op", tc.req.Op, err)
		}
		if took < tc.want {
			t.Fatalf("%s gave up after %v, before its bound %v", tc.req.Op, took, tc.want)
		}
	}
}
