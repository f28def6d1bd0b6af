package dataserver_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

const (
	aliceToken  = "alice-token-0001"
	bobToken    = "bob-token-0002"
	plantsToken = "plants-token-0003"
)

// credServer is a real data server on 127.0.0.1 taking owner and service
// tokens and task credentials signed with key.
type credServer struct {
	addr string
	key  auth.TaskKey
}

func startCredServer(t *testing.T) *credServer {
	t.Helper()
	tokens := &auth.Tokens{}
	for _, e := range []struct {
		token, name string
		role        auth.Role
	}{{aliceToken, "alice", auth.RoleOwner}, {bobToken, "bob", auth.RoleOwner}, {plantsToken, "vmgrid-plants", auth.RoleService}} {
		if err := tokens.AddRole(e.token, e.name, e.role); err != nil {
			t.Fatal(err)
		}
	}
	s := &credServer{}
	s.addr, s.key = testutil.DataServer(t, tokens)
	return s
}

func (s *credServer) client(t *testing.T, token string, extra ...grpc.DialOption) *dataclient.Client {
	return testutil.DataClient(t, s.addr, token, extra...)
}

func (s *credServer) task(t *testing.T, owner, task string, ttl time.Duration) *dataclient.Client {
	t.Helper()
	tok, err := s.key.MintTask(owner, task, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return s.client(t, tok)
}

func put(t *testing.T, c *dataclient.Client, path, body string) error {
	t.Helper()
	_, err := c.UploadReader(context.Background(), bytes.NewReader([]byte(body)), int64(len(body)), path, nil)
	return err
}

func read(c *dataclient.Client, path string) (string, error) {
	var b bytes.Buffer
	_, err := c.ReadRange(context.Background(), path, 0, 0, &b)
	return b.String(), err
}

func wantDenied(t *testing.T, what string, err error) {
	t.Helper()
	if !errdefs.IsPermissionDenied(err) {
		t.Errorf("%s: want PermissionDenied, got %v", what, err)
	}
}

// TestTaskCredentials is issue 15 item 1: a plant acted for any owner with
// a service token and a header. Now it presents a credential the shop
// minted for one owner and one task: it reads that owner's files (not
// what other owners granted them), writes only under the task's output
// prefix, and does nothing else.
func TestTaskCredentials(t *testing.T) {
	s := startCredServer(t)
	ctx := context.Background()
	alice, bob := s.client(t, aliceToken), s.client(t, bobToken)
	for _, f := range []struct {
		c          *dataclient.Client
		path, body string
	}{{alice, "in/data.txt", "alice's input"}, {bob, "secret.txt", "bob's secret"}, {bob, "shared/x", "shared with alice"}} {
		if err := put(t, f.c, f.path, f.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := bob.Grant(ctx, "alice", "shared"); err != nil {
		t.Fatal(err)
	}
	if got, err := read(alice.ForOwner("bob"), "shared/x"); err != nil || got != "shared with alice" {
		t.Fatalf("alice reads what bob shared: %q %v", got, err)
	}

	task := s.task(t, "alice", "t-1", time.Minute)
	if got, err := read(task, "in/data.txt"); err != nil || got != "alice's input" {
		t.Fatalf("task reads its owner's input: %q %v", got, err)
	}
	if _, err := read(task, "secret.txt"); !errdefs.IsNotFound(err) {
		t.Errorf("bob's path in alice's namespace: want NotFound, got %v", err)
	}
	_, err := read(task.ForOwner("bob"), "secret.txt")
	wantDenied(t, "task reads bob's file", err)
	_, err = read(task.ForOwner("bob"), "shared/x")
	wantDenied(t, "task reads what bob granted its owner", err)
	_, err = task.ForOwner("bob").List(ctx, "")
	wantDenied(t, "task lists bob's files", err)
	_, err = task.ForOwner("bob").Stat(ctx, "shared/x")
	wantDenied(t, "task stats bob's file", err)

	if err := put(t, task, "tasks/t-1/out/x", "result"); err != nil {
		t.Fatalf("task writes its output: %v", err)
	}
	if got, err := read(alice, "tasks/t-1/out/x"); err != nil || got != "result" {
		t.Fatalf("alice reads the task's output: %q %v", got, err)
	}
	for _, p := range []string{"tasks/t-2/x", "notes.txt", "tasks/t-10/x", "in/data.txt"} {
		wantDenied(t, "task uploads "+p, put(t, task, p, "overwritten"))
	}
	wantDenied(t, "task deletes", task.Delete(ctx, "in/data.txt"))
	wantDenied(t, "task grants", task.Grant(ctx, "bob", "in"))
	wantDenied(t, "task revokes", task.Revoke(ctx, "bob", "in"))
	_, _, err = task.Grants(ctx)
	wantDenied(t, "task lists grants", err)
	if got, _ := read(alice, "in/data.txt"); got != "alice's input" {
		t.Fatalf("alice's input became %q", got)
	}

	_, err = read(s.task(t, "alice", "t-1", -time.Second), "in/data.txt")
	if !errdefs.IsUnauthenticated(err) {
		t.Errorf("expired credential: want Unauthenticated, got %v", err)
	}
	other := auth.TaskKey(bytes.Repeat([]byte{7}, auth.MinTaskKeyBytes))
	forged, _ := other.MintTask("alice", "t-1", time.Minute)
	if _, err := read(s.client(t, forged), "in/data.txt"); !errdefs.IsUnauthenticated(err) {
		t.Errorf("credential of another key: want Unauthenticated, got %v", err)
	}
}

// actAs sends the header plants used to act for an owner with.
func actAs(owner string) grpc.DialOption {
	return grpc.WithUnaryInterceptor(func(ctx context.Context, m string, req, reply any, cc *grpc.ClientConn, inv grpc.UnaryInvoker, o ...grpc.CallOption) error {
		return inv(metadata.AppendToOutgoingContext(ctx, "x-vmgrid-act-as", owner), m, req, reply, cc, o...)
	})
}

// TestNoActAs: the service token the audit stole opened every owner's
// files with "x-vmgrid-act-as". Services are not owners on the data
// server, and the header is no longer read by anyone.
func TestNoActAs(t *testing.T) {
	s := startCredServer(t)
	ctx := context.Background()
	if err := put(t, s.client(t, aliceToken), "in/data.txt", "alice's input"); err != nil {
		t.Fatal(err)
	}
	plants := s.client(t, plantsToken, actAs("alice"))
	_, err := plants.API.Stat(ctx, &datav1.StatRequest{Path: "in/data.txt"})
	wantDenied(t, "service token acting for alice", err)
	_, err = plants.API.List(ctx, &datav1.ListRequest{})
	wantDenied(t, "service token lists", err)
	_, err = read(plants.ForOwner("alice"), "in/data.txt")
	wantDenied(t, "service token reads alice's file as her", err)

	// An owner's token with the header is still that owner.
	bob := s.client(t, bobToken, actAs("alice"))
	if files, err := bob.List(ctx, ""); err != nil || len(files) != 0 {
		t.Fatalf("bob with act-as alice lists %v, %v; want bob's (none)", files, err)
	}
	if _, err := bob.API.Stat(ctx, &datav1.StatRequest{Path: "in/data.txt"}); !errdefs.IsNotFound(err) {
		t.Fatalf("bob with act-as alice stats her file: %v", err)
	}
}
