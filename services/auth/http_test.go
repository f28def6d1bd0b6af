package auth

import (
	"net/http/httptest"
	"testing"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

func TestHTTPCaller(t *testing.T) {
	tok := &Tokens{}
	if err := tok.Add("owner-token-1", "alice"); err != nil {
		t.Fatal(err)
	}
	if err := tok.AddRole("service-token", "plants", RoleService); err != nil {
		t.Fatal(err)
	}
	a := &Authenticator{Tokens: tok}
	for _, c := range []struct {
		header string
		want   string
		check  func(error) bool
	}{
		{"Bearer owner-token-1", "alice", nil},
		{"bearer owner-token-1", "alice", nil}, // RFC 7235: the scheme is case-insensitive
		{"", "", errdefs.IsUnauthenticated},
		{"Basic owner-token-1", "", errdefs.IsUnauthenticated},
		{"Bearer wrong-token", "", errdefs.IsUnauthenticated},
		{"Bearer service-token", "", errdefs.IsPermissionDenied},
	} {
		r := httptest.NewRequest("GET", "/v1/events", nil)
		if c.header != "" {
			r.Header.Set("Authorization", c.header)
		}
		got, err := a.HTTPCaller(r, RoleOwner, RoleOperator)
		if c.check == nil && (err != nil || got.Name != c.want) {
			t.Errorf("%q: %+v, %v; want %s", c.header, got, err, c.want)
		}
		if c.check != nil && !c.check(err) {
			t.Errorf("%q: %v, want the other error", c.header, err)
		}
	}
}
