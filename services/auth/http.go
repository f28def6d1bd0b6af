package auth

import (
	"fmt"
	"net/http"
	"slices"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// HTTPCaller authenticates an HTTP request the way the interceptors
// authenticate a call: its "Authorization: Bearer TOKEN" header names a
// caller by the same tokens (and task credentials). With roles given, a
// caller of another role is refused (PermissionDenied). For the HTTP
// endpoints that are not gRPC methods (the shop's dashboard and events);
// the HTTP/JSON API itself goes through the gRPC path.
func (a *Authenticator) HTTPCaller(r *http.Request, roles ...Role) (Caller, error) {
	h := r.Header.Get("Authorization")
	if h == "" {
		return Caller{}, fmt.Errorf("%s needs an \"Authorization: Bearer TOKEN\" header: %w", r.URL.Path, errdefs.ErrUnauthenticated)
	}
	token, err := parseBearer(h)
	if err != nil {
		return Caller{}, err
	}
	c, err := a.caller(token)
	if err != nil {
		return Caller{}, err
	}
	if len(roles) > 0 && !slices.Contains(roles, c.Role) {
		return Caller{}, fmt.Errorf("%s may not be used by %s %q: %w", r.URL.Path, c.Role, c.Name, errdefs.ErrPermissionDenied)
	}
	return c, nil
}
