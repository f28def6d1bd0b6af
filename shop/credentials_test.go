package shop

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/auth"
)

func stageInDAG() *computev1.ConfigDAG {
	return &computev1.ConfigDAG{Actions: []*computev1.Action{{Id: "in", Kind: &computev1.Action_StageIn{StageIn: &computev1.StageInAction{Files: []string{"a.txt"}}}}}}
}

// verifyTask returns who a task credential stands for, as a data server
// with key sees it.
func verifyTask(t *testing.T, key auth.TaskKey, cred string) auth.Caller {
	t.Helper()
	const m = "/x.v1.X/Do"
	a := &auth.Authenticator{TaskKey: key, Policy: auth.Policy{m: {auth.RoleTask}}}
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+cred))
	var c auth.Caller
	_, err := a.UnaryServerInterceptor()(ctx, nil, &grpc.UnaryServerInfo{FullMethod: m}, func(ctx context.Context, _ any) (any, error) {
		c, _ = auth.CallerOf(ctx)
		return nil, nil
	})
	if err != nil {
		t.Fatalf("the credential does not verify: %v", err)
	}
	return c
}

// Issue 15 item 1: the shop calls plants as a service, and a request that
// stages in brings a credential for its owner and request only — minted by
// the shop, never stored in etcd.
func TestShopMintsTaskCredentials(t *testing.T) {
	te := startTestEtcd(t)
	keyFile := filepath.Join(t.TempDir(), "task.key")
	if err := auth.NewTaskKeyFile(keyFile); err != nil {
		t.Fatal(err)
	}
	key, err := auth.LoadTaskKey(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	ts := startTestShop(t, te, Config{TaskKey: key, ServiceToken: "shop-service-token"})
	p := &fakePlant{name: "p1", vms: map[string]bool{}}
	runPlant(t, te, p, "", 5)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	eventually(t, 10*time.Second, "the plant registered", func() bool { _, ok := ts.shop.market.Plant("p1"); return ok })

	if _, err := ts.create(ctx, &shopv1.CreateVMRequest{RequestId: "plain"}); err != nil {
		t.Fatal(err)
	}
	if p.last.DataCredential != "" || p.lastAuth != "Bearer shop-service-token" {
		t.Fatalf("a VM that stages nothing: credential %q, authorization %q", p.last.DataCredential, p.lastAuth)
	}
	if _, err := ts.create(ctx, &shopv1.CreateVMRequest{RequestId: "staged", Config: stageInDAG()}); err != nil {
		t.Fatal(err)
	}
	cred := p.last.DataCredential
	if c := verifyTask(t, key, cred); c.Name != "demo" || c.Role != auth.RoleTask || c.Task != "staged" {
		t.Fatalf("the credential stands for %+v; want owner demo, task staged", c)
	}
	resp, err := te.newClient().Get(ctx, "", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		if strings.Contains(string(kv.Value), cred) || strings.Contains(string(kv.Value), "vmgt1.") {
			t.Fatalf("etcd key %s holds a task credential", kv.Key)
		}
	}
	// Output prefixes outside the task are refused at submission.
	if _, err := ts.client.SubmitTask(ctx, &shopv1.SubmitTaskRequest{RequestId: "t", Command: "true", OutputPrefix: "elsewhere/out"}); codeOf(err) != codes.InvalidArgument && codeOf(err) != codes.FailedPrecondition {
		t.Fatalf("an output prefix outside the task: %v", err)
	}
}

// A shop without a task key cannot stage in: it says so before any plant
// is asked.
func TestStageInNeedsATaskKey(t *testing.T) {
	te := startTestEtcd(t)
	ts := startTestShop(t, te, Config{})
	p := &fakePlant{name: "p1", vms: map[string]bool{}}
	runPlant(t, te, p, "", 5)
	eventually(t, 10*time.Second, "the plant registered", func() bool { _, ok := ts.shop.market.Plant("p1"); return ok })
	_, err := ts.create(context.Background(), &shopv1.CreateVMRequest{RequestId: "staged", Config: stageInDAG()})
	if codeOf(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "--task-key") || p.created() != 0 {
		t.Fatalf("stage_in on a shop without a task key: %v (%d creates)", err, p.created())
	}
}

func TestCheckOutputPrefix(t *testing.T) {
	for prefix, ok := range map[string]bool{"": true, "tasks/t-1/out": true, "tasks/t-1/": true, "tasks/t-1": true,
		"tasks/t-10/out": false, "tasks/": false, "notes": false, "tasks/t-1/../t-2/out": false} {
		if err := checkOutputPrefix("t-1", prefix); (err == nil) != ok {
			t.Errorf("%q: %v", prefix, err)
		}
	}
}
