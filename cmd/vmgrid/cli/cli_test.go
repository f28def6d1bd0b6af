package cli

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/imageserver"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errw bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	code = run(ctx, args, &out, &errw)
	return code, out.String(), errw.String()
}

// A command line the CLI does not understand fails with one line and a
// non-zero exit code (cobra alone prints the group's help and exits 0).
func TestBadCommandLines(t *testing.T) {
	clearEnv(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "missing subcommand"},
		{[]string{"nosuch"}, "unknown command"},
		{[]string{"vm"}, "missing subcommand"},
		{[]string{"vm", "nosuch"}, `unknown subcommand "nosuch"`},
		{[]string{"data", "frobnicate", "x"}, `unknown subcommand "frobnicate"`},
		{[]string{"vm", "get"}, "accepts 1 arg(s), received 0"},
		{[]string{"image", "fetch", "only-one"}, "accepts 2 arg(s), received 1"},
		{[]string{"cache", "flush", "extra"}, "unknown command"},
		{[]string{"vm", "ls", "--token="}, "no token"},
	} {
		code, _, stderr := runCLI(t, tc.args...)
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		if code == 0 || len(lines) != 1 || !strings.Contains(stderr, tc.want) {
			t.Errorf("vmgrid %s: exit %d, stderr %q; want a non-zero exit and one line with %q", strings.Join(tc.args, " "), code, stderr, tc.want)
		}
	}
}

// cutProxy forwards to target and cuts every connection once it has sent
// limit bytes back: an upstream that goes away in the middle of a transfer.
func cutProxy(t *testing.T, target string, limit int64) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	var sent atomic.Int64
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				go func() { _, _ = io.Copy(u, c) }()
				_, _ = io.CopyN(c, u, max(limit-sent.Load(), 0))
				sent.Store(limit) // later connections get nothing back
			}()
		}
	}()
	return l.Addr().String()
}

// `image fetch` whose transfer fails says so without drawing 100%, and
// keeps what arrived in PATH.partial.
func TestImageFetchFailsTruthfully(t *testing.T) {
	clearEnv(t)
	ctx := context.Background()
	tokens := &auth.Tokens{}
	if err := tokens.AddRole("operator-token", "ops", auth.RoleOperator); err != nil {
		t.Fatal(err)
	}
	t.Setenv("VMGRID_OPERATOR_TOKEN", "operator-token")
	srv, err := imageserver.Start(ctx, imageserver.Config{Server: services.Options{Name: "imageserver", Listen: "127.0.0.1:0"},
		Store: imageserver.StoreConfig{DataDir: t.TempDir()}, Tokens: tokens})
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(sctx) }()
	t.Cleanup(func() { cancel(); <-done })

	dir := t.TempDir()
	data := make([]byte, 16<<20) // random: compression does not shrink it
	_, _ = rand.Read(data)
	src := filepath.Join(dir, "mem.state")
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runCLI(t, "image", "--server", srv.Addr(), "publish", "img", "-q", "--file", "memory:"+src); code != 0 {
		t.Fatalf("publish: %s", stderr)
	}
	out := filepath.Join(dir, "fetched")
	code, _, stderr := runCLI(t, "image", "--server", cutProxy(t, srv.Addr(), 4<<20), "fetch", "img", "mem.state", "--output-file", out)
	if code == 0 {
		t.Fatal("a fetch through a connection cut after 4 MiB of 16 MiB succeeded")
	}
	if strings.Contains(stderr, "100%") {
		t.Fatalf("the failed fetch drew 100%%:\n%s", stderr)
	}
	if _, err := os.Stat(out + ".partial"); err != nil {
		t.Fatalf("the partial download is gone: %v", err)
	}
	if _, err := os.Stat(out); err == nil {
		t.Fatal("a failed fetch left PATH")
	}
}

// silentListener accepts connections and never answers: a service that
// hangs (issue 15 item 5: `vm ls` hung for 12 minutes during an outage).
func silentListener(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	return l.Addr().String()
}

// Every call has a deadline: a unary call ends after --timeout, a stream
// that cannot reach its service too, each with one line naming it.
func TestCallsHaveDeadlines(t *testing.T) {
	clearEnv(t)
	addr := silentListener(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"vm", "ls", "--shop", addr, "--token", "some-token"}, "shop " + addr + " did not answer within 1s (--timeout)"},
		{[]string{"vm", "watch", "vm-1", "--shop", addr, "--token", "some-token"}, "shop " + addr + ": not reached within 1s"},
		{[]string{"image", "ls", "--server", addr, "--token", "some-token"}, "image server " + addr + " did not answer"},
		{[]string{"cache", "stats", "--server", addr, "--token", "some-token"}, "compute server " + addr + " did not answer"},
		{[]string{"data", "ls", "--server", addr, "--token", "some-token"}, "data server " + addr + " did not answer"},
	} {
		start := time.Now()
		code, _, stderr := runCLI(t, append(tc.args, "--timeout", "1s")...)
		took := time.Since(start)
		if code == 0 || strings.Count(strings.TrimSpace(stderr), "\n") != 0 || !strings.Contains(stderr, tc.want) || took > 10*time.Second {
			t.Errorf("vmgrid %s: exit %d after %s, stderr %q; want one line with %q within seconds", strings.Join(tc.args, " "), code, took, stderr, tc.want)
		}
	}
	// A service that refuses connections fails at once, naming it.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := l.Addr().String()
	l.Close()
	start := time.Now()
	code, _, stderr := runCLI(t, "vm", "create", "--shop", closed, "--token", "some-token")
	if code == 0 || !strings.Contains(stderr, "Unavailable: shop "+closed) || time.Since(start) > 10*time.Second {
		t.Errorf("vm create against a closed port: exit %d after %s: %q", code, time.Since(start), stderr)
	}
}
