package shop_test

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	"github.com/vmgrid/vmgrid/deploy/grid"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/shop"
	"github.com/vmgrid/vmgrid/shop/market"
)

func shopClient(t testing.TB, addr, token string) shopv1.ShopServiceClient {
	t.Helper()
	cc, err := services.Dial(addr, services.TLSFiles{}, grpc.WithPerRPCCredentials(auth.Credentials{Token: token, Insecure: true}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return shopv1.NewShopServiceClient(cc)
}

func createVM(ctx context.Context, c shopv1.ShopServiceClient, req *shopv1.CreateVMRequest) (*computev1.ClassAd, error) {
	return testutil.CreateVM(ctx, c, req)
}

func code(err error) codes.Code { s, _ := status.FromError(err); return s.Code() }

func execA(id string, after []string, script string) *computev1.Action {
	return &computev1.Action{Id: id, After: after, Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"sh", "-c", script}}}}
}

// vmsOnPlants counts a VM id on every plant of the grid.
func vmsOnPlants(t *testing.T, g *grid.Grid, id string) int {
	n := 0
	for _, p := range g.Plants {
		if _, err := p.Line.GetVM(id); err == nil {
			n++
		}
	}
	return n
}

// TestShop runs a real grid (embedded etcd, image server, three plants with
// FUSE views and QEMU guests, the shop) and drives it through the shop.
func TestShop(t *testing.T) {
	testutil.NeedQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	g, err := grid.Up(ctx, grid.Config{Dir: testutil.ShortTempDir(t), Plants: 3, Golden: "tiny", AgentPath: testutil.GuestAgent(t), NoFsync: true, Insecure: true, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	// A second owner.
	appendToken(t, g, "bob-token-0001 bob")
	time.Sleep(1100 * time.Millisecond) // the shop rereads the tokens file within a second
	alice := shopClient(t, g.Shop.Addr(), g.Token)

	var first *computev1.ClassAd
	firstReq := &shopv1.CreateVMRequest{RequestId: "r1", NetworkDomain: "lab",
		Config: &computev1.ConfigDAG{Actions: []*computev1.Action{execA("hello", nil, "echo hi")}}}
	t.Run("create, get, list", func(t *testing.T) {
		ad, err := createVM(ctx, alice, firstReq)
		if err != nil {
			t.Fatal(err)
		}
		if ad.State != computev1.VMState_VM_STATE_RUNNING || ad.Owner != "demo" || ad.VmId != shop.VMID("demo", "r1") {
			t.Fatalf("classad %+v", ad)
		}
		got, err := alice.GetVM(ctx, &shopv1.GetVMRequest{VmId: ad.VmId})
		if err != nil || got.Plant != ad.Plant {
			t.Fatalf("GetVM: %v %v", got, err)
		}
		list, err := alice.ListVMs(ctx, &shopv1.ListVMsRequest{})
		if err != nil || len(list.Vms) != 1 {
			t.Fatalf("ListVMs: %v %v", list, err)
		}
		first = ad
	})

	t.Run("another owner is refused", func(t *testing.T) {
		bob := shopClient(t, g.Shop.Addr(), "bob-token-0001")
		if _, err := bob.GetVM(ctx, &shopv1.GetVMRequest{VmId: first.VmId}); code(err) != codes.PermissionDenied {
			t.Fatalf("GetVM of another owner's VM: %v", err)
		}
		if _, err := bob.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: first.VmId}); code(err) != codes.PermissionDenied {
			t.Fatalf("DestroyVM of another owner's VM: %v", err)
		}
		if list, err := bob.ListVMs(ctx, &shopv1.ListVMsRequest{}); err != nil || len(list.Vms) != 0 {
			t.Fatalf("bob sees %v (%v)", list, err)
		}
		nobody := shopClient(t, g.Shop.Addr(), "not-a-token-at-all")
		if _, err := nobody.ListVMs(ctx, &shopv1.ListVMsRequest{}); code(err) != codes.Unauthenticated {
			t.Fatalf("unknown token: %v", err)
		}
	})

	t.Run("a retried request makes one VM", func(t *testing.T) {
		var wg sync.WaitGroup
		ids := make([]string, 3)
		errs := make([]error, 3)
		for i := range ids {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ad, err := createVM(ctx, alice, &shopv1.CreateVMRequest{RequestId: "r2"})
				errs[i] = err
				if err == nil {
					ids[i] = ad.VmId
				}
			}()
		}
		wg.Wait()
		for i := range ids {
			if errs[i] != nil || ids[i] != ids[0] {
				t.Fatalf("retries: %v %v", ids, errs)
			}
		}
		if n := vmsOnPlants(t, g, ids[0]); n != 1 {
			t.Fatalf("the VM is on %d plants", n)
		}
	})

	t.Run("a shop restarted in between answers as before", func(t *testing.T) {
		tokens, _ := auth.Load(g.TokensFile)
		s2, err := shop.Start(ctx, shop.RunConfig{Server: services.Options{Listen: "127.0.0.1:0"}, Etcd: services.EtcdConfig{Endpoints: []string{g.Etcd.Endpoint}}, Images: g.Images.Addr(), Tokens: tokens, ServiceTokenFile: g.ServiceTokenFile})
		if err != nil {
			t.Fatal(err)
		}
		sctx, scancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { s2.Serve(sctx); close(done) }()
		defer func() { scancel(); <-done }()
		c2 := shopClient(t, s2.Addr(), g.Token)
		got, err := c2.GetVM(ctx, &shopv1.GetVMRequest{VmId: first.VmId})
		if err != nil || got.Plant != first.Plant || got.Pid != first.Pid {
			t.Fatalf("other shop: %v %v", got, err)
		}
		// A retry repeats the request (issue 15 item 9: another request
		// under a used id is refused).
		again, err := createVM(ctx, c2, firstReq)
		if err != nil || again.VmId != first.VmId {
			t.Fatalf("retry through another shop: %v %v", again, err)
		}
	})

	t.Run("a winner that is gone: the next bid wins", func(t *testing.T) {
		// A plant that bids lowest but is dead by the time it is asked.
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{g.Etcd.Endpoint}})
		if err != nil {
			t.Fatal(err)
		}
		defer cli.Close()
		bctx, bcancel := context.WithCancel(ctx)
		info, _ := json.Marshal(market.PlantInfo{Name: "ghost", Addr: "127.0.0.1:1"})
		lease, _ := cli.Grant(ctx, 30)
		cli.Put(ctx, market.PlantsPrefix+"ghost", string(info), clientv3.WithLease(lease.ID))
		bidding, err := market.StartBidder(bctx, cli, "ghost", func(market.Auction) market.Bid { return market.Bid{Plant: "ghost", Addr: "127.0.0.1:1", Cost: -1000} }, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		defer func() { bcancel(); <-bidding; cli.Revoke(context.Background(), lease.ID) }()
		time.Sleep(200 * time.Millisecond)
		ad, err := createVM(ctx, alice, &shopv1.CreateVMRequest{RequestId: "r3"})
		if err != nil {
			t.Fatal(err)
		}
		if ad.Plant == "ghost" || vmsOnPlants(t, g, ad.VmId) != 1 {
			t.Fatalf("placed on %s, on %d plants", ad.Plant, vmsOnPlants(t, g, ad.VmId))
		}
	})

	t.Run("a DAG that partly matches a golden image runs only the rest", func(t *testing.T) {
		setup := execA("setup", nil, "echo configured > /etc/app.conf")
		cc, err := services.Dial(g.Images.Addr(), services.TLSFiles{}, services.WithToken(g.OperatorToken, services.TLSFiles{}))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		if _, err := plant.BuildGolden(ctx, plant.GoldenOptions{
			Name: "tiny-app", WorkDir: testutil.ShortTempDir(t), Driver: &vmm.QEMU{}, Publish: imageclient.NewClient(cc),
			Recipe:  &imagebuild.Tiny{Hook: plant.GoldenHook, ExtraFiles: map[string]string{"/sbin/vmgrid-agent": testutil.GuestAgent(t)}},
			Actions: []*computev1.Action{setup},
		}); err != nil {
			t.Fatal(err)
		}
		// Same action under another id, then one more.
		same := execA("configure", nil, "echo configured > /etc/app.conf")
		dag := &computev1.ConfigDAG{Actions: []*computev1.Action{same, execA("check", []string{"configure"}, `echo "conf=$(cat /etc/app.conf)" > "$VMGRID_RESULTS"`)}}
		ad, err := createVM(ctx, alice, &shopv1.CreateVMRequest{RequestId: "r4", Config: dag})
		if err != nil {
			t.Fatal(err)
		}
		if ad.Image != "tiny-app" || len(ad.Actions) != 2 || !ad.Actions[0].Skipped || ad.Actions[1].Skipped || ad.Actions[1].Results["conf"] != "configured" {
			t.Fatalf("image %s actions %+v", ad.Image, ad.Actions)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		cycle := &computev1.ConfigDAG{Actions: []*computev1.Action{execA("a", []string{"b"}, "true"), execA("b", []string{"a"}, "true")}}
		if _, err := createVM(ctx, alice, &shopv1.CreateVMRequest{RequestId: "bad1", Config: cycle}); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "cycle") {
			t.Fatalf("cycle: %v", err)
		}
		dangling := &computev1.ConfigDAG{Actions: []*computev1.Action{execA("a", []string{"ghost"}, "true")}}
		if _, err := createVM(ctx, alice, &shopv1.CreateVMRequest{RequestId: "bad2", Config: dangling}); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), `"ghost"`) {
			t.Fatalf("dangling edge: %v", err)
		}
		if _, err := createVM(ctx, alice, &shopv1.CreateVMRequest{RequestId: "bad3", Hardware: &computev1.Hardware{MemoryMib: 999}}); code(err) != codes.FailedPrecondition {
			t.Fatalf("hardware no image has: %v", err)
		}
	})

	t.Run("tasks: stage in, run, stage out", func(t *testing.T) {
		cc, err := dataclient.Dial(g.Data.Addr(), services.TLSFiles{}, g.Token)
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		data := dataclient.NewClient(cc)
		words := "the quick brown fox jumps over the lazy dog\n"
		if _, err := data.UploadReader(ctx, strings.NewReader(words), int64(len(words)), "words.txt", nil); err != nil {
			t.Fatal(err)
		}
		run := func(reqID, command string) *shopv1.Task {
			t.Helper()
			task, err := alice.SubmitTask(ctx, &shopv1.SubmitTaskRequest{RequestId: reqID, Inputs: []string{"words.txt"}, Command: command})
			if err != nil {
				t.Fatal(err)
			}
			stream, err := alice.WatchTask(ctx, &shopv1.GetTaskRequest{TaskId: task.TaskId})
			if err != nil {
				t.Fatal(err)
			}
			var states []string
			for {
				nt, err := stream.Recv()
				if err != nil {
					break
				}
				task = nt
				states = append(states, nt.State.String())
			}
			t.Logf("task %s: %v", task.TaskId, states)
			if vmsOnPlants(t, g, task.VmId) != 0 {
				t.Fatalf("the task's VM %s was not destroyed", task.VmId)
			}
			return task
		}
		ok := run("count", "wc -w < in/words.txt > out/count.txt")
		if ok.State != shopv1.TaskState_TASK_STATE_SUCCEEDED || len(ok.Outputs) != 1 {
			t.Fatalf("task %+v", ok)
		}
		var got strings.Builder
		if _, err := data.ReadRange(ctx, ok.Outputs[0], 0, 0, &got); err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(got.String()) != "9" {
			t.Fatalf("count.txt = %q", got.String())
		}
		bad := run("fails", "echo partial > out/partial.txt; echo oops >&2; exit 3")
		if bad.State != shopv1.TaskState_TASK_STATE_FAILED || bad.ExitCode != 3 || !strings.Contains(bad.StderrTail, "oops") || len(bad.Outputs) != 1 {
			t.Fatalf("failing task %+v", bad)
		}
		// Outputs go under the task's own prefix: its credential writes
		// nowhere else.
		if _, err := alice.SubmitTask(ctx, &shopv1.SubmitTaskRequest{RequestId: "elsewhere", Inputs: []string{"words.txt"}, Command: "true",
			OutputPrefix: "notes"}); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "output_prefix") {
			t.Fatalf("an output prefix outside the task: %v", err)
		}
		again, err := alice.SubmitTask(ctx, &shopv1.SubmitTaskRequest{RequestId: "count", Command: "true"})
		if err != nil || again.TaskId != ok.TaskId || again.State != shopv1.TaskState_TASK_STATE_SUCCEEDED {
			t.Fatalf("resubmitting a request id: %v %v", again, err)
		}
		bob := shopClient(t, g.Shop.Addr(), "bob-token-0001")
		if _, err := bob.GetTask(ctx, &shopv1.GetTaskRequest{TaskId: ok.TaskId}); code(err) != codes.PermissionDenied {
			t.Fatalf("bob reads alice's task: %v", err)
		}
		bcc, _ := dataclient.Dial(g.Data.Addr(), services.TLSFiles{}, "bob-token-0001")
		defer bcc.Close()
		if _, err := dataclient.NewClient(bcc).ForOwner("demo").Stat(ctx, "words.txt"); code(err) != codes.PermissionDenied {
			t.Fatalf("bob reads alice's file: %v", err)
		}
	})

	t.Run("destroy", func(t *testing.T) {
		list, _ := alice.ListVMs(ctx, &shopv1.ListVMsRequest{})
		for _, ad := range list.Vms {
			if _, err := alice.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: ad.VmId}); err != nil {
				t.Fatal(err)
			}
			if vmsOnPlants(t, g, ad.VmId) != 0 {
				t.Fatalf("%s still on a plant", ad.VmId)
			}
		}
		if _, err := alice.GetVM(ctx, &shopv1.GetVMRequest{VmId: first.VmId}); code(err) != codes.NotFound {
			t.Fatalf("GetVM after destroy: %v", err)
		}
	})
}

func appendToken(t *testing.T, g *grid.Grid, line string) {
	t.Helper()
	b, _ := osReadFile(g.TokensFile)
	if err := osWriteFile(g.TokensFile, append(b, []byte(line+"\n")...)); err != nil {
		t.Fatal(err)
	}
}
