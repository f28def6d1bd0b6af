package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// Access to a running VM through the shop: exec, console, port-forward,
// tunnel and ssh. The shop checks the VM is the caller's and relays to its
// plant; no plant address is needed.

// exitCodeError makes the CLI exit with a command's exit code, silently.
type exitCodeError struct{ code int }

func (e *exitCodeError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// detachKey ends `vm console` (Ctrl-], as in telnet and virsh).
const detachKey = 0x1d

func vmAccessCmds(g *globals, s *service) []*cobra.Command {
	return []*cobra.Command{vmExecCmd(g, s), vmConsoleCmd(g, s), vmPortForwardCmd(g, s), vmTunnelCmd(g, s), vmSSHCmd(g, s)}
}

func vmExecCmd(g *globals, s *service) *cobra.Command {
	var stdin, tty bool
	var env []string
	var dir string
	c := &cobra.Command{
		Use:   "exec VM [flags] -- COMMAND [ARG...]",
		Short: "Run a command in a VM, its output streamed; exits with its exit code",
		Long: `Run a command in a VM through its guest agent, with its output streamed as it
is written. No shell: run "sh -c '…'" for one. vmgrid exits with the
command's exit code. -i forwards standard input; -t gives the command a
terminal in the guest (with -i, an interactive session: vmgrid vm exec -it VM -- sh).`,
		Args: cobra.MinimumNArgs(2),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			start := &computev1.ExecStart{VmId: args[0], Argv: args[1:], Env: env, Dir: dir, Tty: tty}
			return runExec(cmd, cl, start, stdin)
		}),
	}
	c.Flags().BoolVarP(&stdin, "stdin", "i", false, "forward standard input to the command")
	c.Flags().BoolVarP(&tty, "tty", "t", false, "run the command on a terminal in the guest (raw mode here when stdin is a terminal)")
	c.Flags().StringArrayVarP(&env, "env", "e", nil, "KEY=VALUE in the command's environment (repeatable)")
	c.Flags().StringVar(&dir, "workdir", "", "working directory in the guest")
	return c
}

// rawTerminal puts stdin in raw mode when it is a terminal and returns how
// to restore it and the terminal's size (0, 0 when it is none).
func rawTerminal(in io.Reader) (restore func(), rows, cols uint32) {
	f, ok := in.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return func() {}, 0, 0
	}
	w, h, _ := term.GetSize(int(f.Fd()))
	old, err := term.MakeRaw(int(f.Fd()))
	if err != nil {
		return func() {}, uint32(h), uint32(w)
	}
	return func() { _ = term.Restore(int(f.Fd()), old) }, uint32(h), uint32(w)
}

func runExec(cmd *cobra.Command, cl shopv1.ShopServiceClient, start *computev1.ExecStart, forwardStdin bool) error {
	ctx, cancel := context.WithCancel(cmd.Context())
	defer cancel()
	restore := func() {}
	if start.Tty {
		var rows, cols uint32
		restore, rows, cols = rawTerminal(cmd.InOrStdin())
		if rows > 0 && cols > 0 {
			start.Size = &computev1.TerminalSize{Rows: rows, Cols: cols}
		}
	}
	defer restore()
	stream, err := cl.ExecStream(ctx)
	if err != nil {
		return err
	}
	if err := stream.Send(&computev1.ExecStreamRequest{Kind: &computev1.ExecStreamRequest_Start{Start: start}}); err != nil {
		return recvErr(stream, err)
	}
	if forwardStdin {
		go sendChunks(cmd.InOrStdin(), func(b []byte) error {
			return stream.Send(&computev1.ExecStreamRequest{Kind: &computev1.ExecStreamRequest_Stdin{Stdin: b}})
		}, func() {
			_ = stream.Send(&computev1.ExecStreamRequest{Kind: &computev1.ExecStreamRequest_StdinClose{StdinClose: true}})
		})
		if start.Tty {
			go forwardResizes(ctx, cmd.InOrStdin(), stream)
		}
	} else if err := stream.Send(&computev1.ExecStreamRequest{Kind: &computev1.ExecStreamRequest_StdinClose{StdinClose: true}}); err != nil {
		return recvErr(stream, err)
	}
	return execOutput(cmd, stream, restore)
}

// execOutput writes the command's output as it comes and returns its exit.
func execOutput(cmd *cobra.Command, stream grpc.BidiStreamingClient[computev1.ExecStreamRequest, computev1.ExecStreamResponse], restore func()) error {
	for {
		m, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return errors.New("the exec stream ended without an exit status")
			}
			return err
		}
		switch k := m.Kind.(type) {
		case *computev1.ExecStreamResponse_Stdout:
			_, _ = cmd.OutOrStdout().Write(k.Stdout)
		case *computev1.ExecStreamResponse_Stderr:
			_, _ = cmd.ErrOrStderr().Write(k.Stderr)
		case *computev1.ExecStreamResponse_Exit:
			restore()
			if k.Exit.Error != "" {
				fmt.Fprintln(cmd.ErrOrStderr(), "vmgrid:", k.Exit.Error)
			}
			if k.Exit.ExitCode != 0 {
				code := int(k.Exit.ExitCode)
				if code < 0 || code > 255 {
					code = 255
				}
				return &exitCodeError{code: code}
			}
			return nil
		}
	}
}

// forwardResizes sends the terminal's new size whenever it changes.
func forwardResizes(ctx context.Context, in io.Reader, stream grpc.BidiStreamingClient[computev1.ExecStreamRequest, computev1.ExecStreamResponse]) {
	f, ok := in.(*os.File)
	if !ok {
		return
	}
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGWINCH)
	defer signal.Stop(ch)
	for {
		select {
		case <-ctx.Done():
			return
		case <-ch:
			if w, h, err := term.GetSize(int(f.Fd())); err == nil && w > 0 && h > 0 {
				_ = stream.Send(&computev1.ExecStreamRequest{Kind: &computev1.ExecStreamRequest_Resize{Resize: &computev1.TerminalSize{Rows: uint32(h), Cols: uint32(w)}}})
			}
		}
	}
}

// sendChunks sends what r yields in chunks of at most 32 KiB; at its end,
// done.
func sendChunks(r io.Reader, send func([]byte) error, done func()) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if send(bytes.Clone(buf[:n])) != nil {
				return
			}
		}
		if err != nil {
			if done != nil {
				done()
			}
			return
		}
	}
}

// recvErr is why a send on a stream failed: the stream's status.
func recvErr[Req, Resp any](stream grpc.BidiStreamingClient[Req, Resp], err error) error {
	if errors.Is(err, io.EOF) {
		if _, rerr := stream.Recv(); rerr != nil && !errors.Is(rerr, io.EOF) {
			return rerr
		}
	}
	return err
}

func vmConsoleCmd(g *globals, s *service) *cobra.Command {
	var tail uint32
	c := &cobra.Command{
		Use:   "console VM",
		Short: "Attach to a VM's serial console (detach with Ctrl-])",
		Long: `Attach to a VM's serial console, both ways: what the guest writes appears
here, what you type goes to it (raw mode when stdin is a terminal). Ctrl-]
detaches. One client at a time may be attached to a VM's console.`,
		Args: cobra.ExactArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			return runConsole(cmd, cl, args[0], tail)
		}),
	}
	c.Flags().Uint32Var(&tail, "tail", 2048, "first show up to this many of the console's latest bytes")
	return c
}

func runConsole(cmd *cobra.Command, cl shopv1.ShopServiceClient, vmID string, tail uint32) error {
	ctx, cancel := context.WithCancel(cmd.Context())
	defer cancel()
	stream, err := cl.Console(ctx)
	if err != nil {
		return err
	}
	start := &computev1.ConsoleRequest{Kind: &computev1.ConsoleRequest_Start{Start: &computev1.ConsoleStart{VmId: vmID, TailBytes: tail}}}
	if err := stream.Send(start); err != nil {
		return recvErr(stream, err)
	}
	restore, _, _ := rawTerminal(cmd.InOrStdin())
	defer restore()
	fmt.Fprintf(cmd.ErrOrStderr(), "attached to the console of %s; detach with Ctrl-]\r\n", vmID)
	detached := make(chan struct{})
	go func() {
		sendChunks(cmd.InOrStdin(), func(b []byte) error {
			if i := bytes.IndexByte(b, detachKey); i >= 0 {
				if i > 0 {
					_ = stream.Send(&computev1.ConsoleRequest{Kind: &computev1.ConsoleRequest_Input{Input: b[:i]}})
				}
				close(detached)
				cancel()
				return io.EOF
			}
			return stream.Send(&computev1.ConsoleRequest{Kind: &computev1.ConsoleRequest_Input{Input: b}})
		}, nil)
	}()
	for {
		m, err := stream.Recv()
		if err != nil {
			select {
			case <-detached:
				fmt.Fprint(cmd.ErrOrStderr(), "\r\ndetached\r\n")
				return nil
			default:
			}
			if errors.Is(err, io.EOF) {
				return nil // the VM went away
			}
			return err
		}
		_, _ = cmd.OutOrStdout().Write(m.Output)
	}
}

// forwardSpec parses [LOCAL:]REMOTE the way kubectl port-forward does:
// "8080" listens on 8080, ":8080" on a free port, "9000:80" on 9000.
func forwardSpec(spec string) (local, remote int, err error) {
	l, r, two := strings.Cut(spec, ":")
	if !two {
		r = l // "8080": the same port here and there
	}
	if remote, err = strconv.Atoi(r); err != nil || remote < 1 || remote > 65535 {
		return 0, 0, fmt.Errorf("port %q: REMOTE is a port, 1 to 65535 ([LOCAL:]REMOTE)", spec)
	}
	if l == "" {
		return 0, remote, nil
	}
	if local, err = strconv.Atoi(l); err != nil || local < 0 || local > 65535 {
		return 0, 0, fmt.Errorf("port %q: LOCAL is a port, 0 to 65535 ([LOCAL:]REMOTE)", spec)
	}
	return local, remote, nil
}

func vmPortForwardCmd(g *globals, s *service) *cobra.Command {
	var address string
	c := &cobra.Command{
		Use:   "port-forward VM [LOCAL:]REMOTE",
		Short: "Forward a local TCP port to a port of a VM on its network",
		Long: `Listen on a local port and forward every connection to REMOTE on the VM's
address on its domain network, through the shop and the VM's plant (as
kubectl port-forward does). "8080" listens on 8080, ":8080" on a free port
(printed), "9000:80" on 9000. Runs until interrupted.`,
		Args: cobra.ExactArgs(2),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			local, remote, err := forwardSpec(args[1])
			if err != nil {
				return err
			}
			ln, err := net.Listen("tcp", net.JoinHostPort(address, strconv.Itoa(local)))
			if err != nil {
				return err
			}
			defer ln.Close()
			fmt.Fprintf(cmd.OutOrStdout(), "Forwarding from %s -> %s:%d\n", ln.Addr(), args[0], remote)
			context.AfterFunc(cmd.Context(), func() { ln.Close() })
			for {
				conn, err := ln.Accept()
				if err != nil {
					return cmd.Context().Err()
				}
				go func() {
					defer conn.Close()
					if err := tunnel(cmd.Context(), cl, args[0], remote, 0, conn, conn); err != nil {
						fmt.Fprintf(cmd.ErrOrStderr(), "vmgrid: %s:%d: %s\n", args[0], remote, describe(err))
					}
				}()
			}
		}),
	}
	c.Flags().StringVar(&address, "address", "127.0.0.1", "local address to listen on")
	return c
}

func vmTunnelCmd(g *globals, s *service) *cobra.Command {
	var wait time.Duration
	c := &cobra.Command{
		Use:   "tunnel VM PORT",
		Short: "Connect standard input and output to a port of a VM (an ssh ProxyCommand)",
		Long: `Connect standard input and output to PORT on the VM's address on its domain
network, through the shop: what ssh's ProxyCommand wants, e.g.
  ssh -o ProxyCommand='vmgrid vm tunnel VM 22' alice@VM
(vmgrid vm ssh does that for you). While the guest refuses the port (a
service still starting, e.g. a new clone's sshd), it retries for --wait.`,
		Args: cobra.ExactArgs(2),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			port, err := strconv.Atoi(args[1])
			if err != nil || port < 1 || port > 65535 {
				return fmt.Errorf("port %q: 1 to 65535", args[1])
			}
			return tunnel(cmd.Context(), cl, args[0], port, wait, cmd.InOrStdin(), cmd.OutOrStdout())
		}),
	}
	c.Flags().DurationVar(&wait, "wait", 30*time.Second, "how long to retry while the guest refuses the port (0: fail at once)")
	return c
}

type forwardStream = grpc.BidiStreamingClient[computev1.PortForwardRequest, computev1.PortForwardResponse]

// connect opens a PortForward stream to the guest's port; while the guest
// refuses it (UNAVAILABLE) it tries again until wait has passed.
func connect(ctx context.Context, cl shopv1.ShopServiceClient, vmID string, port int, wait time.Duration) (forwardStream, error) {
	deadline := time.Now().Add(wait)
	for {
		stream, err := cl.PortForward(ctx)
		if err != nil {
			return nil, err
		}
		start := &computev1.PortForwardRequest{Kind: &computev1.PortForwardRequest_Start{Start: &computev1.PortForwardStart{VmId: vmID, Port: uint32(port)}}}
		if err = stream.Send(start); err != nil {
			err = recvErr(stream, err)
		} else {
			var first *computev1.PortForwardResponse
			if first, err = stream.Recv(); err == nil {
				if !first.Connected {
					return nil, errors.New("the plant did not confirm the connection")
				}
				return stream, nil
			}
		}
		if status.Code(err) != codes.Unavailable || time.Now().After(deadline) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// tunnel relays in and out through a PortForward stream until the guest
// closes its side.
func tunnel(ctx context.Context, cl shopv1.ShopServiceClient, vmID string, port int, wait time.Duration, in io.Reader, out io.Writer) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := connect(ctx, cl, vmID, port, wait)
	if err != nil {
		return err
	}
	go sendChunks(in, func(b []byte) error {
		return stream.Send(&computev1.PortForwardRequest{Kind: &computev1.PortForwardRequest_Data{Data: b}})
	}, func() { _ = stream.CloseSend() })
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if _, err := out.Write(m.Data); err != nil {
			return err
		}
	}
}

func vmSSHCmd(g *globals, s *service) *cobra.Command {
	var user string
	c := &cobra.Command{
		Use:   "ssh VM [-- SSH-ARGS...]",
		Short: "ssh into a VM through the shop (as the user its create added)",
		Long: `Run ssh to the VM through a tunnel of the shop (ProxyCommand: vmgrid vm
tunnel VM 22), as the user the VM's create added with --user (or --login).
Host keys are remembered per VM (HostKeyAlias=VM; a new VM's key is
accepted on first use: it is reached only through the authenticated
tunnel). Arguments after -- go to ssh (e.g. a command, or -i KEY).`,
		Args: cobra.MinimumNArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			return runSSH(cmd, g, s, cl, args[0], user, args[1:])
		}),
	}
	c.Flags().StringVarP(&user, "login", "l", "", "user to log in as (default: the user the VM's create added)")
	return c
}

func runSSH(cmd *cobra.Command, g *globals, s *service, cl shopv1.ShopServiceClient, vmID, user string, extra []string) error {
	ad, err := cl.GetVM(cmd.Context(), &shopv1.GetVMRequest{VmId: vmID})
	if err != nil {
		return err
	}
	if user == "" {
		if user = ad.LoginUser; user == "" {
			return fmt.Errorf("vm %s was created without a user: pass --login USER (or create it with --user and --ssh-key)", vmID)
		}
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	env, err := tunnelEnv(g, s)
	if err != nil {
		return err
	}
	args := []string{
		"-o", "ProxyCommand=" + shellQuote(self) + " vm tunnel " + shellQuote(vmID) + " 22",
		"-o", "HostKeyAlias=vmgrid-" + vmID,
		"-o", "StrictHostKeyChecking=accept-new",
		"-l", user, vmID,
	}
	c := exec.CommandContext(cmd.Context(), "ssh", append(args, extra...)...)
	c.Stdin, c.Stdout, c.Stderr = cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr()
	c.Env = append(os.Environ(), env...)
	if err := c.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return &exitCodeError{code: ee.ExitCode()}
		}
		return fmt.Errorf("ssh: %w", err)
	}
	return nil
}

// tunnelEnv passes the settings this command resolved to the tunnel ssh
// runs (environment, not arguments: ps shows arguments).
func tunnelEnv(g *globals, s *service) ([]string, error) {
	addrs, err := s.addrList(g)
	if err != nil {
		return nil, err
	}
	token, err := s.bearer(g)
	if err != nil {
		return nil, err
	}
	tls, err := g.clientTLS()
	if err != nil {
		return nil, err
	}
	return []string{"VMGRID_SHOP=" + addrs[0], "VMGRID_TOKEN=" + token,
		"VMGRID_TLS_CA=" + tls.CAFile, "VMGRID_TLS_CERT=" + tls.CertFile, "VMGRID_TLS_KEY=" + tls.KeyFile}, nil
}

// shellQuote quotes s for the shell ssh runs its ProxyCommand with.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
