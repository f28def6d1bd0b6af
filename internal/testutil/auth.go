package testutil

import (
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

// Tokens of the roles tests call servers as (Tokens, TokensFile).
const (
	OwnerToken     = "owner-token-alice" // owner "alice"
	OperatorToken  = "operator-token-01"
	PublisherToken = "publisher-token-01"
	ServiceToken   = "service-token-0001"
)

const tokensBody = OwnerToken + " alice owner\n" + OperatorToken + " ops operator\n" +
	PublisherToken + " pub publisher\n" + ServiceToken + " vmgrid service\n"

// Tokens returns the test tokens, one per role, for a role's Config.Tokens.
func Tokens(tb testing.TB) *auth.Tokens {
	tb.Helper()
	tk, err := auth.Load(TokensFile(tb))
	if err != nil {
		tb.Fatal(err)
	}
	return tk
}

// TokensFile writes the test tokens to a file (a role's --tokens).
func TokensFile(tb testing.TB) string {
	tb.Helper()
	return writeSecret(tb, "tokens", tokensBody)
}

// ServiceTokenFile writes ServiceToken to a file (--service-token-file).
func ServiceTokenFile(tb testing.TB) string {
	tb.Helper()
	return writeSecret(tb, "service.token", ServiceToken+"\n")
}

func writeSecret(tb testing.TB, name, body string) string {
	p := filepath.Join(tb.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		tb.Fatal(err)
	}
	return p
}

// As is the dial option calling as token (no TLS).
func As(token string) grpc.DialOption { return services.WithToken(token, services.TLSFiles{}) }
