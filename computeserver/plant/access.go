package plant

import (
	"context"
	"fmt"
	"net"
	"sync"

	"google.golang.org/grpc/codes"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Access streams into running guests: an exec stream through the agent,
// the serial console, a TCP connection to a port of the guest. Each is an
// Access registered with its VM, so destroying the VM ends them all.

// Access is one open access stream of a VM. Ctx ends when the VM goes or
// the caller's context ends; Close releases it.
type Access struct {
	Ctx    context.Context
	cancel context.CancelFunc
	set    *accessSet
	n      int
	once   sync.Once
}

// Close ends the stream's context and unregisters it.
func (a *Access) Close() {
	a.once.Do(func() {
		a.cancel()
		a.set.mu.Lock()
		delete(a.set.open, a.n)
		a.set.mu.Unlock()
	})
}

// accessSet is a VM's open access streams.
type accessSet struct {
	mu      sync.Mutex
	closed  bool // the VM is being torn down: no new streams
	next    int
	open    map[int]*Access
	console bool // a client is attached to the serial console
}

func (s *accessSet) add(ctx context.Context, id string) (*Access, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("vm %q is going away: %w", id, errdefs.ErrNotFound)
	}
	if s.open == nil {
		s.open = map[int]*Access{}
	}
	s.next++
	actx, cancel := context.WithCancel(ctx)
	a := &Access{Ctx: actx, cancel: cancel, set: s, n: s.next}
	s.open[a.n] = a
	return a, nil
}

// close ends every stream and refuses new ones.
func (s *accessSet) close() {
	s.mu.Lock()
	s.closed = true
	open := s.open
	s.open = nil
	s.mu.Unlock()
	for _, a := range open {
		a.cancel()
	}
}

// running returns a VM that finished creating and runs, with an access
// stream registered.
func (p *Plant) running(ctx context.Context, id string) (*vm, *Access, error) {
	v, err := p.lookup(id)
	if err != nil {
		return nil, nil, err
	}
	select {
	case <-v.ready:
	case <-ctx.Done():
		return nil, nil, ctx.Err()
	}
	v.mu.Lock()
	state, m := v.ad.State, v.m
	v.mu.Unlock()
	if state != computev1.VMState_VM_STATE_RUNNING || m == nil {
		return nil, nil, fmt.Errorf("vm %q is %s, not running: %w", id, state, errdefs.ErrFailedPrecondition)
	}
	a, err := v.access.add(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	return v, a, nil
}

// ExecStream starts a command in the guest with its input and output
// streamed. The caller reads the stream until its last response, then
// closes both.
func (p *Plant) ExecStream(ctx context.Context, start *computev1.ExecStart) (*Access, *agent.Stream, error) {
	v, a, err := p.running(ctx, start.VmId)
	if err != nil {
		return nil, nil, err
	}
	ac, ok := v.agent.(*agent.Client)
	if !ok || ac == nil {
		a.Close()
		if v.agent != nil { // qemu-ga runs commands, but streams nothing
			return nil, nil, fmt.Errorf("vm %q runs qemu-ga, not vmgrid's agent: streamed exec needs vmgrid's agent (qemu-ga images: ssh, or the create's exec actions): %w", start.VmId, errdefs.ErrFailedPrecondition)
		}
		return nil, nil, fmt.Errorf("vm %q has no agent connection: %w", start.VmId, errdefs.ErrFailedPrecondition)
	}
	req := agent.Request{Argv: start.Argv, Env: start.Env, Dir: start.Dir, TTY: start.Tty}
	if sz := start.GetSize(); sz != nil {
		req.Rows, req.Cols = uint16(sz.Rows), uint16(sz.Cols)
	}
	s, err := ac.ExecStream(req)
	if err != nil {
		a.Close()
		return nil, nil, fmt.Errorf("agent of %s: %w: %w", start.VmId, err, errdefs.ErrUnavailable)
	}
	return a, s, nil
}

// Console attaches to the guest's serial console and returns the last
// tail bytes it wrote (from its log) with the connection. One client at a
// time: QEMU serves one.
func (p *Plant) Console(ctx context.Context, id string, tail int) (*Access, net.Conn, []byte, error) {
	v, a, err := p.running(ctx, id)
	if err != nil {
		return nil, nil, nil, err
	}
	v.access.mu.Lock()
	busy := v.access.console
	v.access.console = true
	v.access.mu.Unlock()
	if busy {
		a.Close()
		return nil, nil, nil, fmt.Errorf("the console of vm %q is attached elsewhere; detach that one first: %w", id, errdefs.ErrFailedPrecondition)
	}
	detach := func() {
		v.access.mu.Lock()
		v.access.console = false
		v.access.mu.Unlock()
	}
	conn, err := vmm.DialConsole(a.Ctx, v.m)
	if err != nil {
		detach()
		a.Close()
		return nil, nil, nil, fmt.Errorf("%w: %w", err, errdefs.ErrUnavailable)
	}
	// The stream's end detaches: the connection closes, the slot frees.
	context.AfterFunc(a.Ctx, func() { conn.Close(); detach() })
	return a, conn, vmm.ConsoleTail(v.m, tail), nil
}

// PortForward connects to a TCP port of the guest on its domain network.
func (p *Plant) PortForward(ctx context.Context, id string, port int) (*Access, net.Conn, error) {
	_, a, err := p.running(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	conn, err := p.DialGuest(a.Ctx, id, port)
	if err != nil {
		a.Close()
		if errdefs.Code(err) == codes.Unknown { // refused, unreachable, timed out
			err = fmt.Errorf("vm %q port %d: %w: %w", id, port, err, errdefs.ErrUnavailable)
		}
		return nil, nil, err
	}
	context.AfterFunc(a.Ctx, func() { conn.Close() })
	return a, conn, nil
}

// loginUser is the first user the request's add_user actions make.
func loginUser(d *computev1.ConfigDAG) string {
	for _, a := range d.GetActions() {
		if u := a.GetAddUser(); u != nil {
			return u.User
		}
	}
	return ""
}
