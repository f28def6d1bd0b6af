package auth

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Policy maps a full method name ("/pkg.Service/Method") to the roles that
// may call it.
type Policy map[string][]Role

// Allow adds every method of a service to the policy with the given roles.
func (p Policy) Allow(sd grpc.ServiceDesc, roles ...Role) Policy {
	for _, m := range sd.Methods {
		p["/"+sd.ServiceName+"/"+m.MethodName] = roles
	}
	for _, s := range sd.Streams {
		p["/"+sd.ServiceName+"/"+s.StreamName] = roles
	}
	return p
}

// Set sets the roles of one method of a service, replacing what Allow gave it.
func (p Policy) Set(sd grpc.ServiceDesc, method string, roles ...Role) Policy {
	p["/"+sd.ServiceName+"/"+method] = roles
	return p
}

// Public reports which methods need no token (health, reflection).
func Public(method string) bool {
	return strings.HasPrefix(method, "/grpc.health.v1.") || strings.HasPrefix(method, "/grpc.reflection.")
}

// Authenticator checks every call against tokens, task credentials and a
// policy.
type Authenticator struct {
	Tokens *Tokens
	// TaskKey, when set, lets task credentials in (data servers).
	TaskKey TaskKey
	Policy  Policy
	now     func() time.Time
}

func (a *Authenticator) authenticate(ctx context.Context, method string) (context.Context, error) {
	if Public(method) {
		return ctx, nil
	}
	roles, ok := a.Policy[method]
	if !ok {
		return nil, fmt.Errorf("%s has no access policy on this server: %w", method, errdefs.ErrPermissionDenied)
	}
	token, err := bearer(ctx, method)
	if err != nil {
		return nil, err
	}
	c, err := a.caller(token)
	if err != nil {
		return nil, err
	}
	if !slices.Contains(roles, c.Role) {
		return nil, fmt.Errorf("%s may not be called by %s %q: %w", method, c.Role, c.Name, errdefs.ErrPermissionDenied)
	}
	return WithCaller(ctx, c), nil
}

func (a *Authenticator) caller(token string) (Caller, error) {
	if strings.HasPrefix(token, taskPrefix) {
		now := time.Now
		if a.now != nil {
			now = a.now
		}
		return a.TaskKey.verify(token, now())
	}
	if a.Tokens != nil {
		if c, ok := a.Tokens.lookup(token); ok {
			return c, nil
		}
	}
	return Caller{}, fmt.Errorf("unknown token: %w", errdefs.ErrUnauthenticated)
}

// bearer returns the token of a call's "authorization: Bearer TOKEN" header.
func bearer(ctx context.Context, method string) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) == 0 {
		return "", fmt.Errorf("%s needs an \"authorization: Bearer TOKEN\" header: %w", method, errdefs.ErrUnauthenticated)
	}
	return parseBearer(vals[0])
}

// parseBearer reads "Bearer TOKEN" (the scheme in any case, RFC 7235).
func parseBearer(header string) (string, error) {
	scheme, token, ok := strings.Cut(strings.TrimSpace(header), " ")
	if !ok || !strings.EqualFold(scheme, "bearer") || strings.TrimSpace(token) == "" {
		return "", fmt.Errorf("the authorization header must be \"Bearer TOKEN\": %w", errdefs.ErrUnauthenticated)
	}
	return strings.TrimSpace(token), nil
}

// UnaryServerInterceptor authenticates unary calls.
func (a *Authenticator) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		ctx, err := a.authenticate(ctx, info.FullMethod)
		if err != nil {
			return nil, errdefs.ToGRPC(err)
		}
		return h(ctx, req)
	}
}

// StreamServerInterceptor authenticates streaming calls.
func (a *Authenticator) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		ctx, err := a.authenticate(ss.Context(), info.FullMethod)
		if err != nil {
			return errdefs.ToGRPC(err)
		}
		return h(srv, &ctxStream{ss, ctx})
	}
}

// Interceptors returns both interceptors, in the shape services.Options takes.
func (a *Authenticator) Interceptors() ([]grpc.UnaryServerInterceptor, []grpc.StreamServerInterceptor) {
	return []grpc.UnaryServerInterceptor{a.UnaryServerInterceptor()}, []grpc.StreamServerInterceptor{a.StreamServerInterceptor()}
}

type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *ctxStream) Context() context.Context { return s.ctx }

// Credentials is a per-call credential sending a bearer token.
type Credentials struct {
	Token string
	// Insecure allows sending the token without TLS (loopback, tests).
	Insecure bool
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (c Credentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + c.Token}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (c Credentials) RequireTransportSecurity() bool { return !c.Insecure }
