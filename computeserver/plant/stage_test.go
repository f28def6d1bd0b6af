package plant

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// dataGrid is a real data server taking task credentials, with alice's
// and bob's clients.
type dataGrid struct {
	addr       string
	key        auth.TaskKey
	alice, bob *dataclient.Client
}

func startDataGrid(t *testing.T) *dataGrid {
	t.Helper()
	testutil.NeedE2fsprogs(t)
	tokens := &auth.Tokens{}
	if tokens.Add("alice-token-0001", "alice") != nil || tokens.Add("bob-token-0002", "bob") != nil {
		t.Fatal("tokens")
	}
	d := &dataGrid{}
	d.addr, d.key = testutil.DataServer(t, tokens)
	d.alice, d.bob = testutil.DataClient(t, d.addr, "alice-token-0001"), testutil.DataClient(t, d.addr, "bob-token-0002")
	return d
}

func (d *dataGrid) mint(t *testing.T, owner, task string, ttl time.Duration) string {
	tok, err := d.key.MintTask(owner, task, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// recorder is a listener standing for an address a user controls: it
// counts the connections it gets.
func recorder(t *testing.T) (string, *atomic.Int32) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	var n atomic.Int32
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			c.Close()
		}
	}()
	return l.Addr().String(), &n
}

func stageDAG(dataserver string, files ...string) *computev1.ConfigDAG {
	return &computev1.ConfigDAG{Actions: []*computev1.Action{{Id: "stage", Kind: &computev1.Action_StageIn{
		StageIn: &computev1.StageInAction{Dataserver: dataserver, Files: files}}}}}
}

// TestStagingIsConfiguredAndScoped is issue 15 item 1 on the plant: a
// stage_in's dataserver made the plant send its service token to an
// address the user chose. The plant stages only with its configured data
// server and the request's task credential; without either a stage_in is
// refused before anything is created.
func TestStagingIsConfiguredAndScoped(t *testing.T) {
	d := startDataGrid(t)
	ctx := context.Background()
	for _, f := range []struct {
		c    *dataclient.Client
		path string
	}{{d.alice, "job/in.txt"}, {d.bob, "bob.txt"}} {
		body := "data of " + f.path
		if _, err := f.c.UploadReader(ctx, strings.NewReader(body), int64(len(body)), f.path, nil); err != nil {
			t.Fatal(err)
		}
	}
	p, err := New(Config{Name: "p1", Dir: testutil.ShortTempDir(t), MemoryMiB: 1024, DataServer: d.addr})
	if err != nil {
		t.Fatal(err)
	}
	progress := func(computev1.VMState, string) {}

	// Refused up front: no credential; no data server configured.
	_, err = p.CreateVM(ctx, &computev1.CreateVMRequest{Image: "tiny", Owner: "alice", Config: stageDAG("", "job/in.txt")}, progress)
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "data_credential") {
		t.Fatalf("stage_in without a credential: %v", err)
	}
	bare, err := New(Config{Name: "p2", Dir: testutil.ShortTempDir(t), MemoryMiB: 1024})
	if err != nil {
		t.Fatal(err)
	}
	cred := d.mint(t, "alice", "t-1", time.Minute)
	_, err = bare.CreateVM(ctx, &computev1.CreateVMRequest{Image: "tiny", Owner: "alice", Config: stageDAG("", "job/in.txt"), DataCredential: cred}, progress)
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "--dataserver") {
		t.Fatalf("stage_in on a plant without a data server: %v", err)
	}

	// Stage in as the stage_in action does (plugging and mounting need a
	// guest: see e2e_test.go). The address the action names gets nothing.
	evil, dialed := recorder(t)
	v, _, err := p.claim("vm-1", &computev1.ClassAd{VmId: "vm-1", Owner: "alice", Hardware: &computev1.Hardware{}}, 0)
	if err != nil {
		t.Fatal(err)
	}
	v.dataCred = cred
	if err := os.MkdirAll(v.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	a := stageDAG(evil, "job/in.txt").Actions[0].GetStageIn()
	disk, err := p.buildDataDisk(ctx, v, a)
	if err != nil {
		t.Fatal(err)
	}
	if out := testutil.Debugfs(t, disk, "-R", "cat /in/job/in.txt"); !strings.Contains(out, "data of job/in.txt") {
		t.Fatalf("in/job/in.txt on the data disk: %q", out)
	}
	if n := dialed.Load(); n != 0 {
		t.Fatalf("the plant connected %d times to the address the request named", n)
	}
	a.Files = []string{"bob.txt"}
	if _, err := p.buildDataDisk(ctx, v, a); !errdefs.IsNotFound(err) {
		t.Fatalf("alice's task staging bob's file: %v", err)
	}
	v.dataDisk, v.dataMount = disk, DefaultWorkDir
	close(v.ready)

	// The guest writes its output; stage-out writes only under the task's prefix.
	res := filepath.Join(t.TempDir(), "result")
	if err := os.WriteFile(res, []byte("42\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.Debugfs(t, disk, "-w", "-R", "write "+res+" /out/result.txt")
	got, err := p.StageOut(ctx, &computev1.StageOutRequest{VmId: "vm-1", RemotePrefix: "tasks/t-1/out"})
	if err != nil || !slices.Equal(got, []string{"tasks/t-1/out/result.txt"}) {
		t.Fatalf("stage-out with CreateVM's credential: %v %v", got, err)
	}
	var b bytes.Buffer
	if _, err := d.alice.ReadRange(ctx, "tasks/t-1/out/result.txt", 0, 0, &b); err != nil || b.String() != "42\n" {
		t.Fatalf("alice reads the output: %q %v", b.String(), err)
	}
	if _, err := p.StageOut(ctx, &computev1.StageOutRequest{VmId: "vm-1", RemotePrefix: "notes"}); !errdefs.IsPermissionDenied(err) {
		t.Fatalf("stage-out outside the task's prefix: %v", err)
	}
	// The request's own credential is preferred over the stored one.
	other := d.mint(t, "alice", "t-2", time.Minute)
	if got, err := p.StageOut(ctx, &computev1.StageOutRequest{VmId: "vm-1", RemotePrefix: "tasks/t-2/out", DataCredential: other}); err != nil || len(got) != 1 {
		t.Fatalf("stage-out with the request's credential: %v %v", got, err)
	}
	expired := d.mint(t, "alice", "t-1", -time.Second)
	if _, err := p.StageOut(ctx, &computev1.StageOutRequest{VmId: "vm-1", RemotePrefix: "tasks/t-1/out", DataCredential: expired}); !errdefs.IsUnauthenticated(err) {
		t.Fatalf("stage-out with an expired credential: %v", err)
	}
	p.persist(v)
	if ad, err := os.ReadFile(filepath.Join(v.dir, "classad.json")); err != nil || bytes.Contains(ad, []byte(cred)) {
		t.Fatalf("classad.json: %v, or the credential is in it", err)
	}
}
