package clonebench

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"

	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

// identity is how the bench's servers know their callers, as every role
// must: one set of tokens, the bench's own (an operator: it publishes and
// drives the plants) and the services' (plants and the cache proxy read
// their upstream with it, from a file as --service-token-file).
type identity struct {
	tokens      *auth.Tokens
	operator    string
	serviceFile string
}

func newIdentity(dir string) (identity, error) {
	id := identity{tokens: &auth.Tokens{}, operator: randomToken(), serviceFile: filepath.Join(dir, "service.token")}
	service := randomToken()
	if err := id.tokens.AddRole(id.operator, "bench", auth.RoleOperator); err != nil {
		return id, err
	}
	if err := id.tokens.AddRole(service, "vmgrid", auth.RoleService); err != nil {
		return id, err
	}
	return id, os.WriteFile(id.serviceFile, []byte(service+"\n"), 0o600)
}

// dial connects to one of the bench's servers as the bench.
func (id identity) dial(addr string) (*grpc.ClientConn, error) {
	return services.Dial(addr, services.TLSFiles{}, services.WithToken(id.operator, services.TLSFiles{}))
}

func randomToken() string {
	var r [16]byte
	_, _ = rand.Read(r[:])
	return hex.EncodeToString(r[:])
}
