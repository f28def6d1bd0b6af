package cli

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

// service is the server a client verb talks to: an address from a flag
// whose default is an environment variable, and for the services that need
// one, a bearer token the same way.
type service struct {
	addr  string
	token string
	// noToken is the error when a token is needed and none was given.
	noToken string
}

// addrFlag registers the address flag (--NAME, default $ENV or def).
func (s *service) addrFlag(fs *pflag.FlagSet, name, env, def, what string) {
	s.addr = envOr(env, def)
	fs.StringVar(&s.addr, name, s.addr, fmt.Sprintf("%s address (env %s)", what, env))
}

// tokenFlag registers --token (default $VMGRID_TOKEN); dial then requires
// a token and sends it with every call.
func (s *service) tokenFlag(fs *pflag.FlagSet, noToken string) {
	s.noToken = noToken
	fs.StringVar(&s.token, "token", os.Getenv("VMGRID_TOKEN"), "bearer token (env VMGRID_TOKEN)")
}

func (s *service) dial(g *globals) (*grpc.ClientConn, error) {
	var opts []grpc.DialOption
	if s.noToken != "" {
		if s.token == "" {
			return nil, errors.New(s.noToken)
		}
		opts = append(opts, grpc.WithPerRPCCredentials(auth.Credentials{Token: s.token, Insecure: !g.tls.Enabled()}))
	}
	return services.Dial(s.addr, g.tls, opts...)
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
