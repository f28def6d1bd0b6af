package services

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/pflag"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/services/auth"
)

// What every role shares about authentication: its tokens file, the
// interceptors, and the service token it calls other services with.

// AddTokensFlag registers --tokens, the tokens file a server checks its
// callers against.
func AddTokensFlag(fs *pflag.FlagSet, file *string) {
	fs.StringVar(file, "tokens", *file, `tokens file: one "TOKEN NAME [owner|operator|publisher|service]" line per caller (required)`)
}

// AddServiceTokenFlag registers --service-token-file: the identity a
// service calls others with (to says which).
func AddServiceTokenFlag(fs *pflag.FlagSet, file *string, to string) {
	fs.StringVar(file, "service-token-file", *file, "file holding this service's token (role service in the callee's tokens file), sent "+to)
}

// ServerTokens returns tokens, or the tokens file loaded: a server that
// has neither does not start (who names it in the error), since none of
// its RPCs is open to anonymous callers.
func ServerTokens(tokens *auth.Tokens, file, who string) (*auth.Tokens, error) {
	if tokens != nil {
		return tokens, nil
	}
	if file == "" {
		return nil, fmt.Errorf("%s needs a tokens file (--tokens): every RPC is authenticated", who)
	}
	return auth.Load(file)
}

// Authenticated returns o with a's interceptors after o's own (o's slices
// are not shared with the copy).
func (o Options) Authenticated(a *auth.Authenticator) Options {
	un, st := a.Interceptors()
	o.UnaryInterceptors = append(append([]grpc.UnaryServerInterceptor(nil), o.UnaryInterceptors...), un...)
	o.StreamInterceptors = append(append([]grpc.StreamServerInterceptor(nil), o.StreamInterceptors...), st...)
	return o
}

// ServiceToken reads a service token file (one line); "" reads nothing.
func ServiceToken(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("service token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" || strings.ContainsAny(tok, " \t\n") {
		return "", fmt.Errorf("service token file %s: want one token on one line", path)
	}
	return tok, nil
}

// WithToken is the dial option sending token as a bearer token on every
// call (none for ""). Without TLS the token travels in the clear, which
// only loopback and tests should allow.
func WithToken(token string, tls TLSFiles) grpc.DialOption {
	if token == "" {
		return grpc.EmptyDialOption{}
	}
	return grpc.WithPerRPCCredentials(auth.Credentials{Token: token, Insecure: !tls.Enabled()})
}
