package auth

import (
	"bufio"
	"context"
	"crypto/subtle"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Role is what a caller is to the grid.
type Role string

// The roles a token can carry.
const (
	// RoleOwner is a user: they see and change only their own things.
	RoleOwner Role = "owner"
	// RoleOperator runs the grid: every owner's things, images, caches.
	RoleOperator Role = "operator"
	// RolePublisher may publish and delete golden images.
	RolePublisher Role = "publisher"
	// RoleService is a vmgrid service calling another (shop → plant,
	// plant → image server).
	RoleService Role = "service"
	// RoleTask is a task credential: one owner's files, one task's outputs.
	RoleTask Role = "task"
)

func parseRole(s string) (Role, error) {
	switch r := Role(s); r {
	case RoleOwner, RoleOperator, RolePublisher, RoleService:
		return r, nil
	}
	return "", fmt.Errorf("unknown role %q (want owner, operator, publisher or service)", s)
}

// Tokens maps tokens to callers. Tokens loaded from a file follow the file:
// an edit takes effect within a second, without a restart.
type Tokens struct {
	mu      sync.Mutex
	entries []entry
	path    string
	mtime   time.Time
	checked time.Time
}

type entry struct {
	token []byte
	name  string
	role  Role
}

// Load reads a tokens file.
func Load(path string) (*Tokens, error) {
	t, err := parse(path)
	if err != nil {
		return nil, err
	}
	t.path, t.checked = path, time.Now()
	if st, err := os.Stat(path); err == nil {
		t.mtime = st.ModTime()
	}
	return t, nil
}

func parse(path string) (*Tokens, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	defer f.Close()
	t := &Tokens{}
	s := bufio.NewScanner(f)
	for n := 1; s.Scan(); n++ {
		line := strings.TrimSpace(s.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) < 2 || len(fields) > 3 {
			return nil, fmt.Errorf("tokens file %s line %d: want TOKEN NAME [ROLE]", path, n)
		}
		role := RoleOwner
		if len(fields) == 3 {
			if role, err = parseRole(fields[2]); err != nil {
				return nil, fmt.Errorf("tokens file %s line %d: %w", path, n, err)
			}
		}
		if err := t.AddRole(fields[0], fields[1], role); err != nil {
			return nil, fmt.Errorf("tokens file %s line %d: %w", path, n, err)
		}
	}
	return t, s.Err()
}

// Add maps token to an owner.
func (t *Tokens) Add(token, owner string) error { return t.AddRole(token, owner, RoleOwner) }

// AddRole maps token to a caller named name with role.
func (t *Tokens) AddRole(token, name string, role Role) error {
	if len(token) < 8 {
		return fmt.Errorf("token for %q is shorter than 8 characters", name)
	}
	if strings.HasPrefix(token, taskPrefix) {
		return fmt.Errorf("token for %q starts with %q, which marks task credentials", name, taskPrefix)
	}
	if err := imagev1.ValidateName("name", name); err != nil {
		return err
	}
	if _, err := parseRole(string(role)); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.entries = append(t.entries, entry{token: []byte(token), name: name, role: role})
	return nil
}

// reload re-reads the file when it changed (checked at most every second);
// a file that became unreadable or invalid keeps the tokens known so far.
func (t *Tokens) reload() {
	if t.path == "" || time.Since(t.checked) < time.Second {
		return
	}
	t.checked = time.Now()
	st, err := os.Stat(t.path)
	if err != nil || st.ModTime().Equal(t.mtime) {
		return
	}
	if n, err := parse(t.path); err == nil {
		t.entries, t.mtime = n.entries, st.ModTime()
	}
}

// lookup returns the caller a token names. Every entry is compared, so the
// time taken does not say which one matched.
func (t *Tokens) lookup(token string) (Caller, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.reload()
	var c Caller
	found := 0
	for _, e := range t.entries {
		if subtle.ConstantTimeCompare(e.token, []byte(token)) == 1 {
			c, found = Caller{Name: e.name, Role: e.role}, 1
		}
	}
	return c, found == 1
}

// Caller is who a call comes from.
type Caller struct {
	// Name is the owner for owners and task credentials, the operator's,
	// publisher's or service's name otherwise.
	Name string
	Role Role
	// Task is the task (or VM request) a task credential is scoped to.
	Task string
}

// Sees reports whether the caller may see or change things of owner:
// their own, or any for operators.
func (c Caller) Sees(owner string) bool {
	return c.Role == RoleOperator || c.Name == owner && c.Role != RoleService
}

type callerKey struct{}

// WithCaller returns ctx carrying c (for tests and in-process callers).
func WithCaller(ctx context.Context, c Caller) context.Context {
	return context.WithValue(ctx, callerKey{}, c)
}

// WithOwner returns ctx carrying an owner (for tests and in-process callers).
func WithOwner(ctx context.Context, owner string) context.Context {
	return WithCaller(ctx, Caller{Name: owner, Role: RoleOwner})
}

// CallerOf returns the authenticated caller of a call.
func CallerOf(ctx context.Context) (Caller, error) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	if !ok || c.Name == "" {
		return Caller{}, fmt.Errorf("no authenticated caller: %w", errdefs.ErrUnauthenticated)
	}
	return c, nil
}

// Owner returns the name of the authenticated caller of a call: the owner
// whose things it may touch (an operator's own name for operators).
func Owner(ctx context.Context) (string, error) {
	c, err := CallerOf(ctx)
	return c.Name, err
}
