package auth

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

func withToken(token string) context.Context {
	return metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+token))
}

func writeTokens(t *testing.T, body string) *Tokens {
	t.Helper()
	p := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	tk, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	return tk
}

const testMethod = "/x.v1.X/Do"

func TestLoadAndAuthenticate(t *testing.T) {
	tk := writeTokens(t, "# owners\nalice-token-123 alice\n\nbob-token-4567 bob owner\nplant-token-99 plants service\nops-token-000 ops operator\n")
	a := &Authenticator{Tokens: tk, Policy: Policy{testMethod: {RoleOwner, RoleOperator}}}
	ctx, err := a.authenticate(withToken("bob-token-4567"), testMethod)
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := CallerOf(ctx); c.Name != "bob" || c.Role != RoleOwner {
		t.Fatalf("caller %+v", c)
	}
	for _, md := range []metadata.MD{nil, metadata.Pairs("authorization", "Bearer nope-nope-nope"), metadata.Pairs("authorization", "alice-token-123"), metadata.Pairs("authorization", "Basic alice-token-123")} {
		c := metadata.NewIncomingContext(context.Background(), md)
		if _, err := a.authenticate(c, testMethod); !errdefs.IsUnauthenticated(err) {
			t.Fatalf("%v: want Unauthenticated, got %v", md, err)
		}
	}
	// RFC 7235: the scheme is case-insensitive.
	lower := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "bearer alice-token-123"))
	if _, err := a.authenticate(lower, testMethod); err != nil {
		t.Fatalf("lower-case scheme: %v", err)
	}
	// A service token is not an owner: it may not call an owners' method,
	// and there is no header that makes it act for one.
	as := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer plant-token-99", "x-vmgrid-act-as", "alice"))
	if _, err := a.authenticate(as, testMethod); !errdefs.IsPermissionDenied(err) {
		t.Fatalf("a service token calling an owners' method: %v", err)
	}
	// Methods without a policy are closed; public ones are open.
	if _, err := a.authenticate(withToken("ops-token-000"), "/x.v1.X/New"); !errdefs.IsPermissionDenied(err) {
		t.Fatalf("a method without a policy: %v", err)
	}
	if _, err := a.authenticate(context.Background(), "/grpc.health.v1.Health/Check"); err != nil {
		t.Fatalf("health: %v", err)
	}
}

func TestTokensFileErrors(t *testing.T) {
	for _, body := range []string{"short alice\n", "alice-token-123 alice root\n", "alice-token-123\n", "vmgt1.xxxxxxxx alice\n", "alice-token-123 ../x\n"} {
		p := filepath.Join(t.TempDir(), "tokens")
		os.WriteFile(p, []byte(body), 0o600)
		if _, err := Load(p); err == nil {
			t.Errorf("%q: want an error", body)
		}
	}
}

func TestTaskCredentials(t *testing.T) {
	dir := t.TempDir()
	kp := filepath.Join(dir, "task.key")
	if err := NewTaskKeyFile(kp); err != nil {
		t.Fatal(err)
	}
	key, err := LoadTaskKey(kp)
	if err != nil {
		t.Fatal(err)
	}
	pol := Policy{testMethod: {RoleOwner, RoleTask}, "/x.v1.X/Owners": {RoleOwner}}
	a := &Authenticator{Policy: pol, TaskKey: key}
	tok, err := key.MintTask("alice", "t-1", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	ctx, err := a.authenticate(withToken(tok), testMethod)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := CallerOf(ctx)
	if c.Name != "alice" || c.Role != RoleTask || c.Task != "t-1" {
		t.Fatalf("caller %+v", c)
	}
	if !c.TaskMayWrite("tasks/t-1/out/x") || c.TaskMayWrite("tasks/t-10/out/x") || c.TaskMayWrite("notes.txt") || c.TaskMayWrite("tasks/t-1/") {
		t.Fatal("TaskMayWrite")
	}
	if _, err := a.authenticate(withToken(tok), "/x.v1.X/Owners"); !errdefs.IsPermissionDenied(err) {
		t.Fatalf("a task credential on an owners-only method: %v", err)
	}
	// Expired, tampered, signed with another key, or a server without a key.
	a.now = func() time.Time { return time.Now().Add(2 * time.Minute) }
	if _, err := a.authenticate(withToken(tok), testMethod); !errdefs.IsUnauthenticated(err) || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired: %v", err)
	}
	a.now = nil
	other := TaskKey(make([]byte, MinTaskKeyBytes))
	forged, _ := other.MintTask("bob", "t-1", time.Minute)
	payload, _, _ := strings.Cut(strings.TrimPrefix(forged, taskPrefix), ".")
	_, mac, _ := strings.Cut(strings.TrimPrefix(tok, taskPrefix), ".")
	for _, bad := range []string{forged, taskPrefix + payload + "." + mac, taskPrefix + "garbage", tok + "x"} {
		if _, err := a.authenticate(withToken(bad), testMethod); !errdefs.IsUnauthenticated(err) {
			t.Fatalf("%q: want Unauthenticated, got %v", bad, err)
		}
	}
	if _, err := (&Authenticator{Policy: pol}).authenticate(withToken(tok), testMethod); !errdefs.IsUnauthenticated(err) {
		t.Fatalf("a server without a task key: %v", err)
	}
	if _, err := TaskKey(nil).MintTask("alice", "t", time.Minute); err == nil {
		t.Fatal("minting without a key must fail")
	}
}

func TestPoliciesCoverEveryMethod(t *testing.T) {
	for name, p := range map[string]Policy{"shop": ShopPolicy(), "image": ImagePolicy(), "plant": PlantPolicy(), "cacheproxy": CacheProxyPolicy(), "data": DataPolicy()} {
		if len(p) == 0 {
			t.Fatalf("%s: empty policy", name)
		}
		for m, roles := range p {
			if len(roles) == 0 {
				t.Errorf("%s %s: no roles", name, m)
			}
		}
	}
	if got := ImagePolicy()["/vmgrid.image.v1.ImageService/WriteBlocks"]; len(got) != 2 {
		t.Fatalf("WriteBlocks: %v", got)
	}
}
