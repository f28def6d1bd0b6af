package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/services"
)

// service is the server a client verb talks to and the bearer token it
// sends (every service authenticates every call). Each comes from, first
// to last: the flag, the environment, the client context (config.go), the
// built-in default; resolve picks them when the verb runs.
type service struct {
	what string // "shop", "image server": names it in errors
	// addrs is the address setting; ctxAddr its value in a context.
	addrs   setting
	ctxAddr func(*clientContext) []string
	token   setting
	// operator: the verb mostly needs an operator or publisher token
	// (publishing, deleting, disks, caches, vm ls --all).
	operator bool
	// noToken is the error when no token was given.
	noToken string
}

// setting is a flag whose value, when not given, comes from environment
// variables, then from a context, then from the flag's default.
type setting struct {
	flag *pflag.Flag
	envs []string
}

func (st setting) value(fromContext ...string) string {
	if st.flag.Changed {
		return st.flag.Value.String()
	}
	for _, e := range st.envs {
		if v := os.Getenv(e); v != "" {
			return v
		}
	}
	for _, v := range fromContext {
		if v != "" {
			return v
		}
	}
	return st.flag.DefValue
}

func newSetting(fs *pflag.FlagSet, name string, envs ...string) setting {
	return setting{flag: fs.Lookup(name), envs: envs}
}

// addrFlag registers the address flag (--NAME, env ENV, then the
// context's, then def).
func (s *service) addrFlag(fs *pflag.FlagSet, name, env, def, what string, fromContext func(*clientContext) []string) {
	s.what, s.ctxAddr = what, fromContext
	fs.String(name, def, fmt.Sprintf("%s address (env %s, else the context's)", what, env))
	s.addrs = newSetting(fs, name, env)
}

// tokenFlag registers --token (env VMGRID_TOKEN, else the context's),
// sent with every call.
func (s *service) tokenFlag(fs *pflag.FlagSet, noToken string) {
	s.noToken = noToken
	fs.String("token", "", "bearer token (env VMGRID_TOKEN, else the context's)")
	s.token = newSetting(fs, "token")
}

// operatorTokenFlag registers --token for verbs that mostly need an
// operator or publisher: $VMGRID_OPERATOR_TOKEN comes before
// $VMGRID_TOKEN, and the context's operator token before its token.
func (s *service) operatorTokenFlag(fs *pflag.FlagSet) {
	s.operator = true
	s.noToken = "no token: pass --token or set VMGRID_OPERATOR_TOKEN (or VMGRID_TOKEN; vmgrid up writes both into DIR/env and its context)"
	fs.String("token", "", "bearer token (env VMGRID_OPERATOR_TOKEN, else VMGRID_TOKEN, else the context's operator token, else its token)")
	s.token = newSetting(fs, "token")
}

// bearer picks the token.
func (s *service) bearer(g *globals) (string, error) {
	cx, err := g.clientContext()
	if err != nil {
		return "", err
	}
	if s.operator {
		s.token.envs = []string{"VMGRID_OPERATOR_TOKEN", "VMGRID_TOKEN"}
		return s.token.value(cx.OperatorToken, cx.Token), nil
	}
	s.token.envs = []string{"VMGRID_TOKEN"}
	return s.token.value(cx.Token), nil
}

// addrList is the address setting as a comma-separated list.
func (s *service) addrList(g *globals) ([]string, error) {
	cx, err := g.clientContext()
	if err != nil {
		return nil, err
	}
	v := s.addrs.value(strings.Join(s.ctxAddr(cx), ","))
	var out []string
	for _, a := range strings.Split(v, ",") {
		if a = strings.TrimSpace(a); a != "" {
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no %s address", s.what)
	}
	return out, nil
}

// dial connects to the service at addr with the token and TLS files of
// the settings.
func (s *service) dial(g *globals, addr string) (*grpc.ClientConn, error) {
	token, err := s.bearer(g)
	if err != nil {
		return nil, err
	}
	if token == "" {
		return nil, errors.New(s.noToken)
	}
	tls, err := g.clientTLS()
	if err != nil {
		return nil, err
	}
	t := target{what: s.what, addr: addr}
	return services.Dial(addr, tls, services.WithToken(token, tls),
		grpc.WithChainUnaryInterceptor(t.unaryDeadline(g.timeout)), grpc.WithChainStreamInterceptor(t.streamConnect(g.timeout)))
}

// target is the service a connection reaches, as errors name it.
type target struct{ what, addr string }

// unaryDeadline bounds every unary call by d (--timeout) and says in one
// line which service did not answer or could not be reached.
func (s target) unaryDeadline(d time.Duration) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if d > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, d)
			defer cancel()
		}
		return s.explain(ctx, d, invoker(ctx, method, req, reply, cc, opts...))
	}
}

// streamConnect gives streams (vm create, watch, publish, fetch) no overall
// deadline, but fails them when the service is not reached within d.
func (s target) streamConnect(d time.Duration) grpc.StreamClientInterceptor {
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		if err := connected(ctx, cc, d); err != nil {
			return nil, status.Errorf(codes.DeadlineExceeded, "%s %s: not reached within %s (--timeout)", s.what, s.addr, d)
		}
		cs, err := streamer(ctx, desc, cc, method, opts...)
		return cs, s.explain(ctx, d, err)
	}
}

// connected waits up to d for cc to connect; a failed attempt returns at
// once (the call then fails fast with its reason).
func connected(ctx context.Context, cc *grpc.ClientConn, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	cc.Connect()
	for {
		st := cc.GetState()
		if st == connectivity.Ready || st == connectivity.TransientFailure {
			return nil
		}
		if !cc.WaitForStateChange(ctx, st) {
			return ctx.Err()
		}
	}
}

// explain names the service in a deadline or connection error.
func (s target) explain(ctx context.Context, d time.Duration, err error) error {
	switch status.Code(err) {
	case codes.DeadlineExceeded:
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return status.Errorf(codes.DeadlineExceeded, "%s %s did not answer within %s (--timeout)", s.what, s.addr, d)
		}
	case codes.Unavailable:
		return status.Errorf(codes.Unavailable, "%s %s: %s", s.what, s.addr, status.Convert(err).Message())
	}
	return err
}

// verbFunc is a client verb's body, given a client of its service.
type verbFunc[T any] func(cmd *cobra.Command, args []string, cl T) error

// withClient makes a verb's RunE: a client of s (at its first address),
// handed to fn.
func withClient[T any](g *globals, s *service, client func(grpc.ClientConnInterface) T, fn verbFunc[T]) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		addrs, err := s.addrList(g)
		if err != nil {
			return err
		}
		return callAt(g, s, addrs[0], client, func(cl T) error { return fn(cmd, args, cl) })
	}
}

// callAt dials s at addr, wraps the connection in a client, runs fn and
// closes.
func callAt[T any](g *globals, s *service, addr string, client func(grpc.ClientConnInterface) T, fn func(T) error) error {
	cc, err := s.dial(g, addr)
	if err != nil {
		return err
	}
	defer cc.Close()
	return fn(client(cc))
}

// serverCmd completes c as a server role: the logger and the global TLS
// files go into opts, then run serves until the command's context ends.
func serverCmd(g *globals, c *cobra.Command, opts *services.Options, run func(ctx context.Context) error) *cobra.Command {
	c.Args = cobra.NoArgs
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		return g.withLogger(func(log *zap.Logger) error {
			opts.Logger, opts.TLS = log, g.tls
			return run(cmd.Context())
		})
	}
	return c
}

// role is what every role's Start returns.
type role interface{ Serve(context.Context) error }

// serve starts a role and serves it until ctx ends.
func serve[C any, R role](ctx context.Context, start func(context.Context, C) (R, error), cfg C) error {
	r, err := start(ctx, cfg)
	if err != nil {
		return err
	}
	return r.Serve(ctx)
}
