package services

import (
	"context"
	"sync"
)

// Undo is a stack of cleanups, run newest first: a role's Start pushes one
// for everything it opens, and the same stack both undoes a half-started
// role (defer undo.OnError(&err)) and stops a running one (Role.Close), so
// the order of shutdown is written once, as the order of start read
// backwards.
type Undo struct {
	mu  sync.Mutex
	fns []func()
}

// Push adds f; it runs before everything pushed earlier.
func (u *Undo) Push(f func()) {
	u.mu.Lock()
	u.fns = append(u.fns, f)
	u.mu.Unlock()
}

// Run runs the cleanups, newest first, and empties the stack (a second Run
// does nothing).
func (u *Undo) Run() {
	u.mu.Lock()
	fns := u.fns
	u.fns = nil
	u.mu.Unlock()
	for i := len(fns) - 1; i >= 0; i-- {
		fns[i]()
	}
}

// OnError runs the stack when *err is set: the one deferred cleanup of a
// Start.
func (u *Undo) OnError(err *error) {
	if *err != nil {
		u.Run()
	}
}

// Role is the handle every vmgrid role's Start returns (in the shape of
// etcd's embed.StartEtcd): the gRPC server, already listening, and the undo
// stack that stops everything the role opened.
type Role struct {
	*Server
	undo *Undo
}

// NewRole returns the handle of a started role. Its stack must already
// hold srv.Shutdown, pushed after what the service uses, so Close stops
// serving before it closes them.
func NewRole(srv *Server, undo *Undo) *Role { return &Role{Server: srv, undo: undo} }

// Serve serves until ctx ends, then closes the role.
func (r *Role) Serve(ctx context.Context) error {
	err := r.Server.Serve(ctx)
	r.Close()
	return err
}

// Close stops serving and undoes the start; it is safe to call more than
// once and together with Serve.
func (r *Role) Close() { r.undo.Run() }
