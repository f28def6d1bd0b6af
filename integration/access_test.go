package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/deploy/grid"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// accessGrid is a grid with the tiny golden image whose tokens file also
// has a second owner, mallory; the tests reach its VMs through the shop.
type accessGrid struct {
	*grid.Grid
	mine, theirs shopv1.ShopServiceClient
}

const malloryToken = "mallory-token-0123456789abcdef"

func startAccessGrid(t *testing.T) *accessGrid { t.Helper(); return startAccessGridOf(t, 1) }

// startAccessGridOf is startAccessGrid with that many plants.
func startAccessGridOf(t *testing.T, plants int) *accessGrid {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("plants mount FUSE views: needs root")
	}
	testutil.NeedQEMU(t)
	dir := testutil.ShortTempDir(t)
	tokens := "d-token-0123456789abcdef demo owner\no-token-0123456789abcdef operator operator\n" +
		"s-token-0123456789abcdef vmgrid service\n" + malloryToken + " mallory owner\n"
	if err := os.WriteFile(filepath.Join(dir, "tokens"), []byte(tokens), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g, err := grid.Up(ctx, grid.Config{Dir: dir, Plants: plants, Golden: "tiny", AgentPath: testutil.GuestAgent(t), NoFsync: true, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	gridTLS = g.ClientTLS
	return &accessGrid{Grid: g,
		mine:   shopv1.NewShopServiceClient(asCaller(t, g.Shop.Addr(), g.Token)),
		theirs: shopv1.NewShopServiceClient(asCaller(t, g.Shop.Addr(), malloryToken))}
}

func (g *accessGrid) createVM(t *testing.T, ctx context.Context, requestID string) string {
	t.Helper()
	s, err := g.mine.CreateVM(ctx, &shopv1.CreateVMRequest{RequestId: requestID})
	if err != nil {
		t.Fatal(err)
	}
	for {
		p, err := s.Recv()
		if err != nil {
			t.Fatalf("create: %v", err)
		}
		if ad := p.GetClassad(); ad != nil && ad.State == computev1.VMState_VM_STATE_RUNNING {
			return ad.VmId
		}
	}
}

type execStream = grpc.BidiStreamingClient[computev1.ExecStreamRequest, computev1.ExecStreamResponse]

func startExec(t *testing.T, ctx context.Context, c shopv1.ShopServiceClient, start *computev1.ExecStart) execStream {
	t.Helper()
	s, err := c.ExecStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&computev1.ExecStreamRequest{Kind: &computev1.ExecStreamRequest_Start{Start: start}}); err != nil {
		t.Fatal(err)
	}
	return s
}

// execResult reads an exec stream to its exit.
func execResult(s execStream) (stdout, stderr string, exit *computev1.ExecExit, err error) {
	var out, errb bytes.Buffer
	for {
		m, err := s.Recv()
		if err != nil {
			return out.String(), errb.String(), nil, err
		}
		out.Write(m.GetStdout())
		errb.Write(m.GetStderr())
		if e := m.GetExit(); e != nil {
			return out.String(), errb.String(), e, nil
		}
	}
}

func TestAccessThroughTheShop(t *testing.T) {
	g := startAccessGrid(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	vm := g.createVM(t, ctx, "access1")

	t.Run("exec streams stdin, stdout, stderr and the exit code", func(t *testing.T) {
		s := startExec(t, ctx, g.mine, &computev1.ExecStart{VmId: vm, Argv: []string{"sh", "-c", "tr a-z A-Z; echo oops >&2; exit 5"}})
		for _, part := range []string{"hello ", "guest\n"} {
			if err := s.Send(&computev1.ExecStreamRequest{Kind: &computev1.ExecStreamRequest_Stdin{Stdin: []byte(part)}}); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Send(&computev1.ExecStreamRequest{Kind: &computev1.ExecStreamRequest_StdinClose{StdinClose: true}}); err != nil {
			t.Fatal(err)
		}
		out, errOut, exit, err := execResult(s)
		if err != nil || out != "HELLO GUEST\n" || errOut != "oops\n" || exit.ExitCode != 5 {
			t.Fatalf("exec: %v stdout %q stderr %q exit %v", err, out, errOut, exit)
		}
	})

	t.Run("exec on a terminal", func(t *testing.T) {
		s := startExec(t, ctx, g.mine, &computev1.ExecStart{VmId: vm, Argv: []string{"sh", "-c", "tty; stty size"}, Tty: true, Size: &computev1.TerminalSize{Rows: 40, Cols: 120}})
		out, _, exit, err := execResult(s)
		if err != nil || !strings.Contains(out, "/dev/pts/") || !strings.Contains(out, "40 120") || exit.ExitCode != 0 {
			t.Fatalf("tty exec: %v %q %v", err, out, exit)
		}
	})

	t.Run("console both ways", func(t *testing.T) { testConsole(t, ctx, g, vm) })

	t.Run("another owner is refused", func(t *testing.T) {
		s := startExec(t, ctx, g.theirs, &computev1.ExecStart{VmId: vm, Argv: []string{"id"}})
		if _, _, _, err := execResult(s); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("mallory's exec in demo's VM: %v", err)
		}
		pf, err := g.theirs.PortForward(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_ = pf.Send(&computev1.PortForwardRequest{Kind: &computev1.PortForwardRequest_Start{Start: &computev1.PortForwardStart{VmId: vm, Port: 22}}})
		if _, err := pf.Recv(); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("mallory's port-forward to demo's VM: %v", err)
		}
		con, err := g.theirs.Console(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_ = con.Send(&computev1.ConsoleRequest{Kind: &computev1.ConsoleRequest_Start{Start: &computev1.ConsoleStart{VmId: vm}}})
		if _, err := con.Recv(); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("mallory's console of demo's VM: %v", err)
		}
	})

	t.Run("bad first messages", func(t *testing.T) {
		s, err := g.mine.ExecStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_ = s.Send(&computev1.ExecStreamRequest{Kind: &computev1.ExecStreamRequest_Stdin{Stdin: []byte("x")}})
		if _, _, _, err := execResult(s); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("exec stream starting with stdin: %v", err)
		}
		s = startExec(t, ctx, g.mine, &computev1.ExecStart{VmId: vm})
		if _, _, _, err := execResult(s); status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "argv") {
			t.Fatalf("exec without a command: %v", err)
		}
		s = startExec(t, ctx, g.mine, &computev1.ExecStart{VmId: "vm-nope", Argv: []string{"true"}})
		if _, _, _, err := execResult(s); status.Code(err) != codes.NotFound {
			t.Fatalf("exec in no VM: %v", err)
		}
	})

	t.Run("streams end when the VM is destroyed", func(t *testing.T) {
		s := startExec(t, ctx, g.mine, &computev1.ExecStart{VmId: vm, Argv: []string{"sh", "-c", "echo started; exec sleep 600"}})
		if m, err := s.Recv(); err != nil || !strings.Contains(string(m.GetStdout()), "started") {
			t.Fatalf("exec start: %v %v", m, err)
		}
		done := make(chan error, 1)
		go func() { _, _, exit, err := execResult(s); done <- errors.Join(err, exitErr(exit)) }()
		if _, err := g.mine.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: vm}); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "went away") {
				t.Fatalf("exec stream after destroy: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("the exec stream outlived its VM")
		}
	})
}

func exitErr(e *computev1.ExecExit) error {
	if e == nil || (e.ExitCode == 0 && e.Error == "") {
		return nil
	}
	return fmt.Errorf("exit %d: %s", e.ExitCode, e.Error)
}

// testConsole attaches to the console: the tail replays what the guest wrote before, a line
// the guest writes to its serial port arrives, a line typed reaches a
// reader in the guest, and a second attach is refused while attached.
func testConsole(t *testing.T, ctx context.Context, g *accessGrid, vm string) {
	// A clone's console log starts at its restore: write a line to replay.
	s := startExec(t, ctx, g.mine, &computev1.ExecStart{VmId: vm, Argv: []string{"sh", "-c", "echo before-the-attach > /dev/ttyS0"}})
	if _, _, exit, err := execResult(s); err != nil || exit.ExitCode != 0 {
		t.Fatalf("write to ttyS0: %v %v", err, exit)
	}
	con, err := g.mine.Console(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := con.Send(&computev1.ConsoleRequest{Kind: &computev1.ConsoleRequest_Start{Start: &computev1.ConsoleStart{VmId: vm, TailBytes: 64 << 10}}}); err != nil {
		t.Fatal(err)
	}
	out := make(chan string, 64)
	go func() {
		for {
			m, err := con.Recv()
			if err != nil {
				close(out)
				return
			}
			out <- string(m.Output)
		}
	}()
	var seen strings.Builder
	waitFor := func(want string) {
		t.Helper()
		deadline := time.After(30 * time.Second)
		for !strings.Contains(seen.String(), want) {
			select {
			case s, ok := <-out:
				if !ok {
					t.Fatalf("console ended before %q; got %q", want, seen.String())
				}
				seen.WriteString(s)
			case <-deadline:
				t.Fatalf("console: no %q in %q", want, seen.String())
			}
		}
	}
	waitFor("before-the-attach") // the tail
	second, err := g.mine.Console(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = second.Send(&computev1.ConsoleRequest{Kind: &computev1.ConsoleRequest_Start{Start: &computev1.ConsoleStart{VmId: vm}}})
	if _, err := second.Recv(); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("a second console attach: %v", err)
	}
	// Output: the guest writes to its serial port.
	s = startExec(t, ctx, g.mine, &computev1.ExecStart{VmId: vm, Argv: []string{"sh", "-c", "echo from-the-guest > /dev/ttyS0"}})
	if _, _, exit, err := execResult(s); err != nil || exit.ExitCode != 0 {
		t.Fatalf("write to ttyS0: %v %v", err, exit)
	}
	waitFor("from-the-guest")
	// Input: a reader in the guest gets a line typed on the console.
	// The port is open (fd 3) before "reading" is printed, so the line
	// typed after it waits in the terminal for head.
	reader := startExec(t, ctx, g.mine, &computev1.ExecStart{VmId: vm, Argv: []string{"sh", "-c", "exec 3</dev/ttyS0; stty -echo <&3; echo reading; head -n 1 <&3"}})
	if m, err := reader.Recv(); err != nil || !strings.Contains(string(m.GetStdout()), "reading") {
		t.Fatalf("console reader: %v %v", m, err)
	}
	if err := con.Send(&computev1.ConsoleRequest{Kind: &computev1.ConsoleRequest_Input{Input: []byte("typed-on-the-console\n")}}); err != nil {
		t.Fatal(err)
	}
	got, _, exit, err := execResult(reader)
	if err != nil || !strings.Contains(got, "typed-on-the-console") || exit.ExitCode != 0 {
		t.Fatalf("guest read from its console: %v %q %v", err, got, exit)
	}
	if err := con.CloseSend(); err != nil {
		t.Fatal(err)
	}
	for range out { // detaching ends the stream
	}
}
