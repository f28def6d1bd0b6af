package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/services"
)

// service is the server a client verb talks to: an address from a flag
// whose default is an environment variable, and a bearer token the same
// way (every service authenticates every call).
type service struct {
	addr  string
	what  string // "shop", "image server": names it in errors
	token string
	// noToken is the error when no token was given.
	noToken string
}

// addrFlag registers the address flag (--NAME, default $ENV or def).
func (s *service) addrFlag(fs *pflag.FlagSet, name, env, def, what string) {
	s.addr, s.what = envOr(env, def), what
	fs.StringVar(&s.addr, name, s.addr, fmt.Sprintf("%s address (env %s)", what, env))
}

// tokenFlag registers --token (default $VMGRID_TOKEN), sent with every
// call.
func (s *service) tokenFlag(fs *pflag.FlagSet, noToken string) {
	s.noToken = noToken
	fs.StringVar(&s.token, "token", os.Getenv("VMGRID_TOKEN"), "bearer token (env VMGRID_TOKEN)")
}

// operatorTokenFlag registers --token for verbs that mostly need an
// operator or publisher (publishing, deleting, disks, caches): its default
// is $VMGRID_OPERATOR_TOKEN when set, else $VMGRID_TOKEN.
func (s *service) operatorTokenFlag(fs *pflag.FlagSet) {
	s.noToken = "no token: pass --token or set VMGRID_OPERATOR_TOKEN (or VMGRID_TOKEN; vmgrid up writes both into DIR/env)"
	fs.StringVar(&s.token, "token", envOr("VMGRID_OPERATOR_TOKEN", os.Getenv("VMGRID_TOKEN")),
		"bearer token (env VMGRID_OPERATOR_TOKEN, else VMGRID_TOKEN)")
}

func (s *service) dial(g *globals) (*grpc.ClientConn, error) {
	if s.token == "" {
		return nil, errors.New(s.noToken)
	}
	return services.Dial(s.addr, g.tls, services.WithToken(s.token, g.tls),
		grpc.WithChainUnaryInterceptor(s.unaryDeadline(g.timeout)), grpc.WithChainStreamInterceptor(s.streamConnect(g.timeout)))
}

// unaryDeadline bounds every unary call by d (--timeout) and says in one
// line which service did not answer or could not be reached.
func (s *service) unaryDeadline(d time.Duration) grpc.UnaryClientInterceptor {
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
func (s *service) streamConnect(d time.Duration) grpc.StreamClientInterceptor {
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
func (s *service) explain(ctx context.Context, d time.Duration, err error) error {
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

// connect dials s and wraps the connection in a client; done closes it.
func connect[T any](g *globals, s *service, client func(grpc.ClientConnInterface) T) (cl T, done func(), err error) {
	cc, err := s.dial(g)
	if err != nil {
		return cl, nil, err
	}
	return client(cc), func() { cc.Close() }, nil
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// serverCmd completes c as a server role: the logger and the global TLS
// files go into opts, then run serves until the command's context ends.
func serverCmd(g *globals, c *cobra.Command, opts *services.Options, run func(ctx context.Context) error) *cobra.Command {
	c.Args = cobra.NoArgs
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		log, err := g.logger()
		if err != nil {
			return err
		}
		defer log.Sync() //nolint:errcheck
		opts.Logger, opts.TLS = log, g.tls
		return run(cmd.Context())
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
