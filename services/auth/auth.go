// Package auth maps bearer tokens to owners. Every call to a service that
// has owners (the shop, the data server) carries "authorization: Bearer
// TOKEN" metadata; the interceptors look the token up in a tokens file and
// put the owner in the context. Handlers ask Owner(ctx).
//
// A tokens file has one "TOKEN OWNER" pair per line; blank lines and lines
// starting with # are ignored. Tokens are compared in constant time and
// never logged.
//
// A line "TOKEN OWNER service" makes a service token: its holder (the
// plants, staging files in and out for the shop's tasks) may act for any
// owner by sending "x-vmgrid-act-as: OWNER"; without that header it acts as
// OWNER itself.
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

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Tokens maps tokens to owners. Tokens loaded from a file follow the file:
// an edit takes effect within a second, without a restart.
type Tokens struct {
	mu      sync.Mutex
	entries []entry
	path    string
	mtime   time.Time
	checked time.Time
}

type entry struct {
	token   []byte
	owner   string
	service bool
}

// ActAsHeader is the metadata key a service token names its owner with.
const ActAsHeader = "x-vmgrid-act-as"

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
		if len(fields) < 2 || len(fields) > 3 || len(fields) == 3 && fields[2] != "service" {
			return nil, fmt.Errorf("tokens file %s line %d: want TOKEN OWNER [service]", path, n)
		}
		if err := t.Add(fields[0], fields[1]); err != nil {
			return nil, fmt.Errorf("tokens file %s line %d: %w", path, n, err)
		}
		t.entries[len(t.entries)-1].service = len(fields) == 3
	}
	return t, s.Err()
}

// Add maps token to owner.
func (t *Tokens) Add(token, owner string) error {
	if len(token) < 8 {
		return fmt.Errorf("token for %q is shorter than 8 characters", owner)
	}
	if err := imagev1.ValidateName("owner", owner); err != nil {
		return err
	}
	t.entries = append(t.entries, entry{token: []byte(token), owner: owner})
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

// lookup returns the owner of token and whether it is a service token.
func (t *Tokens) lookup(token string) (string, bool, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.reload()
	owner, service, found := "", false, 0
	for _, e := range t.entries {
		if subtle.ConstantTimeCompare(e.token, []byte(token)) == 1 {
			owner, service, found = e.owner, e.service, 1
		}
	}
	return owner, service, found == 1
}

type ownerKey struct{}

// Owner returns the authenticated owner of a call.
func Owner(ctx context.Context) (string, error) {
	o, ok := ctx.Value(ownerKey{}).(string)
	if !ok || o == "" {
		return "", fmt.Errorf("no authenticated owner: %w", errdefs.ErrUnauthenticated)
	}
	return o, nil
}

// WithOwner returns ctx carrying owner (for tests and in-process callers).
func WithOwner(ctx context.Context, owner string) context.Context {
	return context.WithValue(ctx, ownerKey{}, owner)
}

func (t *Tokens) authenticate(ctx context.Context, method string, skip func(string) bool) (context.Context, error) {
	if skip != nil && skip(method) {
		return ctx, nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) == 0 {
		return nil, fmt.Errorf("%s needs an \"authorization: Bearer TOKEN\" header: %w", method, errdefs.ErrUnauthenticated)
	}
	token, ok := strings.CutPrefix(vals[0], "Bearer ")
	if !ok {
		return nil, fmt.Errorf("the authorization header must be \"Bearer TOKEN\": %w", errdefs.ErrUnauthenticated)
	}
	owner, service, ok := t.lookup(strings.TrimSpace(token))
	if !ok {
		return nil, fmt.Errorf("unknown token: %w", errdefs.ErrUnauthenticated)
	}
	if as := md.Get(ActAsHeader); len(as) > 0 {
		if !service {
			return nil, fmt.Errorf("only service tokens may act for another owner: %w", errdefs.ErrPermissionDenied)
		}
		if err := imagev1.ValidateName(ActAsHeader, as[0]); err != nil {
			return nil, fmt.Errorf("%v: %w", err, errdefs.ErrInvalidArgument)
		}
		owner = as[0]
	}
	return WithOwner(ctx, owner), nil
}

// Public reports which methods need no token (health, reflection).
func Public(method string) bool {
	return strings.HasPrefix(method, "/grpc.health.v1.") || strings.HasPrefix(method, "/grpc.reflection.")
}

// UnaryServerInterceptor authenticates unary calls.
func (t *Tokens) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		ctx, err := t.authenticate(ctx, info.FullMethod, Public)
		if err != nil {
			return nil, errdefs.ToGRPC(err)
		}
		return h(ctx, req)
	}
}

// StreamServerInterceptor authenticates streaming calls.
func (t *Tokens) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		ctx, err := t.authenticate(ss.Context(), info.FullMethod, Public)
		if err != nil {
			return errdefs.ToGRPC(err)
		}
		return h(srv, &ctxStream{ss, ctx})
	}
}

type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *ctxStream) Context() context.Context { return s.ctx }

// Credentials is a per-call credential sending a bearer token.
type Credentials struct {
	Token string
	// ActAs names the owner a service token acts for.
	ActAs string
	// Insecure allows sending the token without TLS (loopback, tests).
	Insecure bool
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (c Credentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	md := map[string]string{"authorization": "Bearer " + c.Token}
	if c.ActAs != "" {
		md[ActAsHeader] = c.ActAs
	}
	return md, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (c Credentials) RequireTransportSecurity() bool { return !c.Insecure }
