package auth

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/metadata"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

func TestLoadAndAuthenticate(t *testing.T) {
	p := filepath.Join(t.TempDir(), "tokens")
	os.WriteFile(p, []byte("# owners\nalice-token-123 alice\n\nbob-token-4567 bob\n"), 0o600)
	tk, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer bob-token-4567"))
	ctx, err = tk.authenticate(ctx, "/x", nil)
	if err != nil {
		t.Fatal(err)
	}
	if o, _ := Owner(ctx); o != "bob" {
		t.Fatalf("owner %q", o)
	}
	for _, md := range []metadata.MD{nil, metadata.Pairs("authorization", "Bearer nope-nope-nope"), metadata.Pairs("authorization", "alice-token-123")} {
		c := metadata.NewIncomingContext(context.Background(), md)
		if _, err := tk.authenticate(c, "/x", nil); !errdefs.IsUnauthenticated(err) {
			t.Fatalf("%v: want Unauthenticated, got %v", md, err)
		}
	}
	// Service tokens act for others; user tokens may not.
	os.WriteFile(p, []byte("alice-token-123 alice\nplant-token-99 plants service\n"), 0o600)
	tk, err = Load(p)
	if err != nil {
		t.Fatal(err)
	}
	as := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer plant-token-99", ActAsHeader, "alice"))
	if ctx, err = tk.authenticate(as, "/x", nil); err != nil {
		t.Fatal(err)
	}
	if o, _ := Owner(ctx); o != "alice" {
		t.Fatalf("service acting as alice: owner %q", o)
	}
	as = metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer alice-token-123", ActAsHeader, "bob"))
	if _, err := tk.authenticate(as, "/x", nil); !errdefs.IsPermissionDenied(err) {
		t.Fatalf("a user token acting for another owner: %v", err)
	}
	os.WriteFile(p, []byte("short alice\n"), 0o600)
	if _, err := Load(p); err == nil {
		t.Fatal("a short token must be refused")
	}
}
