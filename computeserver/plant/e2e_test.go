package plant_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

// computeServer is an in-process compute server with a client.
type computeServer struct {
	*computeserver.Server
	dir    string
	plants computev1.PlantServiceClient
	stop   func()
}

func startCompute(t *testing.T, upstream string, opts ...func(*computeserver.Config)) *computeServer {
	t.Helper()
	dir := testutil.ShortTempDir(t)
	ctx, cancel := context.WithCancel(context.Background())
	cfg := computeserver.Config{
		Server:   services.Options{Name: "computeserver", Listen: "127.0.0.1:0", Logger: zaptest.NewLogger(t)},
		Upstream: upstream, DataDir: dir, Proxy: gvfs.Config{FlushIdle: -1}, Tokens: testutil.Tokens(t),
	}
	for _, o := range opts {
		o(&cfg)
	}
	pl, err := computeserver.Start(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { pl.Serve(ctx); close(done) }()
	cc, err := services.Dial(pl.Server.Addr(), services.TLSFiles{}, testutil.As(testutil.ServiceToken))
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	cs := &computeServer{Server: pl, dir: dir, plants: computev1.NewPlantServiceClient(cc)}
	cs.stop = func() { once.Do(func() { cc.Close(); cancel(); <-done }) }
	t.Cleanup(cs.stop)
	return cs
}

func create(ctx context.Context, c computev1.PlantServiceClient, req *computev1.CreateVMRequest) (*computev1.ClassAd, []computev1.VMState, error) {
	stream, err := c.CreateVM(ctx, req)
	if err != nil {
		return nil, nil, err
	}
	var states []computev1.VMState
	for {
		p, err := stream.Recv()
		if err != nil {
			return nil, states, err
		}
		states = append(states, p.State)
		if p.Classad != nil {
			return p.Classad, states, nil
		}
	}
}

func exec1(t *testing.T, ctx context.Context, c computev1.PlantServiceClient, id string, script string) string {
	t.Helper()
	resp, err := c.ExecVM(ctx, &computev1.ExecVMRequest{VmId: id, Exec: &computev1.ExecAction{Argv: []string{"sh", "-c", script}}})
	if err != nil {
		t.Fatalf("exec in %s: %v", id, err)
	}
	if resp.ExitCode != 0 || resp.Error != "" {
		t.Fatalf("exec %q in %s: exit %d %s: %s", script, id, resp.ExitCode, resp.Error, resp.Stderr)
	}
	return strings.TrimSpace(string(resp.Stdout))
}

func code(err error) codes.Code { s, _ := status.FromError(err); return s.Code() }

func gone(pid int32) bool { return syscall.Kill(int(pid), 0) == syscall.ESRCH }

func host(id string, a ...*computev1.Action) *computev1.ConfigDAG {
	return &computev1.ConfigDAG{Actions: a}
}

// TestProductionLine builds the tiny golden image for real, publishes it and
// runs clones from it on real compute servers (FUSE view, QEMU under TCG).
func TestProductionLine(t *testing.T) {
	testutil.NeedQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	is := testutil.StartServer(t, "")
	g, err := plant.BuildGolden(ctx, plant.GoldenOptions{
		Name: "tiny", WorkDir: testutil.ShortTempDir(t), Driver: &vmm.QEMU{}, Publish: is.Client, Logger: zaptest.NewLogger(t),
		Recipe: &imagebuild.Tiny{Hook: plant.GoldenHook, ExtraFiles: map[string]string{"/sbin/vmgrid-agent": testutil.GuestAgent(t)}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("golden built: %v", g.Took)
	golden, err := is.Client.API.GetImage(ctx, &imagev1.GetImageRequest{Name: "tiny"})
	if err != nil {
		t.Fatal(err)
	}
	cs := startCompute(t, is.Srv.Addr())

	t.Run("two clones at once, each configured", func(t *testing.T) {
		type out struct {
			ad  *computev1.ClassAd
			err error
		}
		res := make([]out, 2)
		var wg sync.WaitGroup
		for i := range res {
			wg.Add(1)
			go func() {
				defer wg.Done()
				n := strconv.Itoa(i)
				dag := host("",
					&computev1.Action{Id: "name", Kind: &computev1.Action_SetHostname{SetHostname: &computev1.SetHostnameAction{Hostname: "clone" + n}}},
					&computev1.Action{Id: "user", Kind: &computev1.Action_AddUser{AddUser: &computev1.AddUserAction{User: "user" + n, SshKey: "ssh-ed25519 AAAA key" + n}}},
					&computev1.Action{Id: "check", After: []string{"name", "user"}, Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{
						Argv: []string{"sh", "-c", `echo "host=$(hostname)" > "$VMGRID_RESULTS"; echo done`}}}},
				)
				ad, states, err := create(ctx, cs.plants, &computev1.CreateVMRequest{Image: "tiny", Owner: "alice", Config: dag})
				if err == nil && states[len(states)-1] != computev1.VMState_VM_STATE_RUNNING {
					err = errors.New("last state is not RUNNING")
				}
				res[i] = out{ad, err}
			}()
		}
		wg.Wait()
		for i, r := range res {
			if r.err != nil {
				t.Fatalf("clone %d: %v", i, r.err)
			}
			n := strconv.Itoa(i)
			ad := r.ad
			t.Logf("clone %d ready in %v, fetched %d bytes", i, time.Duration(ad.ReadyNanos), ad.FetchedBytes)
			if got := ad.Actions[2].Results["host"]; got != "clone"+n {
				t.Fatalf("classad results: host=%q", got)
			}
			if got := exec1(t, ctx, cs.plants, ad.VmId, "hostname; cat /home/user"+n+"/.ssh/authorized_keys"); got != "clone"+n+"\nssh-ed25519 AAAA key"+n {
				t.Fatalf("clone %d is configured as %q", i, got)
			}
		}
		// Writes stay in each clone's redo log.
		a, b := res[0].ad, res[1].ad
		exec1(t, ctx, cs.plants, a.VmId, "dd if=/dev/urandom of=/root/big bs=1M count=4 2>/dev/null && sync")
		if got := exec1(t, ctx, cs.plants, b.VmId, "ls /root/big 2>/dev/null || echo absent"); got != "absent" {
			t.Fatalf("a write of one clone is visible in another: %q", got)
		}
		redo, err := os.Stat(filepath.Join(cs.dir, "vms", a.VmId, "redo.qcow2"))
		if err != nil || redo.Size() < 4<<20 {
			t.Fatalf("the redo log did not take the writes: %v %v", redo, err)
		}
		after, err := is.Client.API.GetImage(ctx, &imagev1.GetImageRequest{Name: "tiny"})
		if err != nil || string(after.Manifest.Files[2].Sha256) != string(golden.Manifest.Files[2].Sha256) {
			t.Fatalf("golden changed: %v", err)
		}
		// Booting read a small part of the golden disk (the RAM file's
		// blocks, lazy memory, are not the disk's).
		fetched := cachedBytes(t, ctx, cs.Proxy, "tiny", plant.RootFile)
		if fetched > 256<<20/10 {
			t.Fatalf("clones fetched %d bytes of a 256 MiB disk", fetched)
		}
		t.Logf("block bytes fetched for two clones: %d of a 256 MiB disk", fetched)
		// The restores used the resume kernel: the boot kernel and the
		// initramfs never crossed.
		var whole uint64
		for _, f := range golden.Manifest.Files {
			switch f.Name {
			case plant.KernelFile, plant.InitrdFile:
				if cs.Proxy.FileCache().Complete(f) {
					t.Fatalf("the clones fetched %s", f.Name)
				}
			case plant.MemoryFile, plant.ResumeKernelFile, plant.ConfigFile:
				whole += f.Size
			}
		}
		if got := cs.Proxy.FileCache().Received(); got > whole {
			t.Fatalf("the file cache received %d bytes; the memory state, the resume kernel and vm.json are %d", got, whole)
		}
		for _, r := range res {
			if _, err := cs.plants.DestroyVM(ctx, &computev1.DestroyVMRequest{VmId: r.ad.VmId}); err != nil {
				t.Fatal(err)
			}
			if !gone(r.ad.Pid) {
				t.Fatalf("QEMU %d still runs after destroy", r.ad.Pid)
			}
			if _, err := os.Stat(filepath.Join(cs.dir, "vms", r.ad.VmId)); !os.IsNotExist(err) {
				t.Fatalf("VM directory left behind: %v", err)
			}
		}
		if _, err := cs.plants.GetVM(ctx, &computev1.GetVMRequest{VmId: a.VmId}); code(err) != codes.NotFound {
			t.Fatalf("GetVM after destroy: %v", err)
		}
	})

	t.Run("a failing action cleans up and names itself", func(t *testing.T) {
		dag := host("",
			&computev1.Action{Id: "ok", Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"true"}}}},
			&computev1.Action{Id: "breaks", After: []string{"ok"}, Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"sh", "-c", "echo boom >&2; exit 7"}}}},
		)
		_, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{VmId: "vm-fails", Image: "tiny", Config: dag})
		if code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), `"breaks"`) || !strings.Contains(err.Error(), "boom") {
			t.Fatalf("want FailedPrecondition naming the action and its output, got %v", err)
		}
		if _, err := os.Stat(filepath.Join(cs.dir, "vms", "vm-fails")); !os.IsNotExist(err) {
			t.Fatalf("failed VM left its directory: %v", err)
		}
		if out, _ := exec.Command("pgrep", "-f", "vm-fails").Output(); len(out) > 0 {
			t.Fatalf("failed VM left a process: %s", out)
		}
		// A handler recovers the failure.
		dag.Actions[1].OnError = []*computev1.Action{{Id: "fix", Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"true"}}}}}
		ad, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{VmId: "vm-recovers", Image: "tiny", Config: dag})
		if err != nil {
			t.Fatal(err)
		}
		if last := ad.Actions[len(ad.Actions)-1]; !last.Recovered || last.ExitCode != 7 {
			t.Fatalf("want a recovered action, got %+v", last)
		}
		cs.plants.DestroyVM(ctx, &computev1.DestroyVMRequest{VmId: ad.VmId})
	})

	t.Run("QEMU dying while the agent is awaited fails the creation at once", func(t *testing.T) {
		// Issue 15 item 6: the plant waited the agent's full 2 minutes.
		cs3 := startCompute(t, is.Srv.Addr(), func(c *computeserver.Config) { c.Driver = dyingDriver{&vmm.QEMU{}} })
		start := time.Now()
		_, _, err := create(ctx, cs3.plants, &computev1.CreateVMRequest{VmId: "vm-dies", Image: "tiny"})
		if took := time.Since(start); took > 60*time.Second {
			t.Fatalf("the creation took %v after QEMU died", took)
		}
		if code(err) != codes.Unavailable || !strings.Contains(err.Error(), "exited") || !strings.Contains(err.Error(), "guest console (tail)") {
			t.Fatalf("want Unavailable naming the exit with the console's tail, got %v", err)
		}
		if _, err := os.Stat(filepath.Join(cs3.dir, "vms", "vm-dies")); !os.IsNotExist(err) {
			t.Fatalf("failed VM left its directory: %v", err)
		}
		if out, _ := exec.Command("pgrep", "-f", "vm-dies").Output(); len(out) > 0 {
			t.Fatalf("failed VM left a process: %s", out)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		if _, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{Image: "nope"}); code(err) != codes.NotFound {
			t.Fatalf("unknown image: %v", err)
		}
		if _, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{Image: "tiny", Hardware: &computev1.Hardware{MemoryMib: 512}}); code(err) != codes.FailedPrecondition {
			t.Fatalf("other memory than the golden's: %v", err)
		}
		cycle := host("", &computev1.Action{Id: "a", After: []string{"b"}, Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"true"}}}},
			&computev1.Action{Id: "b", After: []string{"a"}, Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"true"}}}})
		if _, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{Image: "tiny", Config: cycle}); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "cycle") {
			t.Fatalf("cycle: %v", err)
		}
	})

	t.Run("stage in and out with a task credential, at the plant's data server only", func(t *testing.T) {
		stageInAndOut(t, ctx, is.Srv.Addr())
	})

	t.Run("suspend on one plant, resume on another", func(t *testing.T) {
		if _, err := is.Client.API.CreateDisk(ctx, &imagev1.CreateDiskRequest{Name: "home", SourceImage: "tiny"}); err != nil {
			t.Fatal(err)
		}
		ad, _, err := create(ctx, cs.plants, &computev1.CreateVMRequest{VmId: "vm-home", Image: "tiny", Owner: "bob", PersistentDisk: "home"})
		if err != nil {
			t.Fatal(err)
		}
		exec1(t, ctx, cs.plants, ad.VmId, "echo on-disk > /root/persist.txt && echo in-memory > /tmp/mem.txt && sync")
		sus, err := cs.plants.SuspendVM(ctx, &computev1.SuspendVMRequest{VmId: ad.VmId})
		if err != nil {
			t.Fatal(err)
		}
		if sus.State != computev1.VMState_VM_STATE_SUSPENDED || sus.SuspendedImage == "" || !gone(ad.Pid) {
			t.Fatalf("suspended classad %+v (pid gone: %v)", sus, gone(ad.Pid))
		}
		cs2 := startCompute(t, is.Srv.Addr())
		stream, err := cs2.plants.ResumeVM(ctx, &computev1.ResumeVMRequest{Classad: sus})
		if err != nil {
			t.Fatal(err)
		}
		var back *computev1.ClassAd
		for back == nil {
			p, err := stream.Recv()
			if err != nil {
				t.Fatal(err)
			}
			back = p.Classad
		}
		if got := exec1(t, ctx, cs2.plants, back.VmId, "cat /root/persist.txt /tmp/mem.txt"); got != "on-disk\nin-memory" {
			t.Fatalf("state after resume: %q", got)
		}
		guest, _ := strconv.ParseInt(exec1(t, ctx, cs2.plants, back.VmId, "date +%s"), 10, 64)
		if d := time.Now().Unix() - guest; d < -5 || d > 5 {
			t.Fatalf("guest clock is %d s off after resume", d)
		}
		if _, err := cs2.plants.DestroyVM(ctx, &computev1.DestroyVMRequest{VmId: back.VmId}); err != nil {
			t.Fatal(err)
		}
	})
}

// stageInAndOut is issue 15 item 1 with a real guest: a request cannot
// name the data server; the plant stages the owner's files in from its
// configured one with the request's task credential, and the task's
// outputs back out under tasks/TASK/ with the same credential.
func stageInAndOut(t *testing.T, ctx context.Context, upstream string) {
	testutil.NeedE2fsprogs(t)
	tokens := &auth.Tokens{}
	if err := tokens.Add("alice-token-0001", "alice"); err != nil {
		t.Fatal(err)
	}
	addr, key := testutil.DataServer(t, tokens)
	alice := testutil.DataClient(t, addr, "alice-token-0001")
	in := "hello from alice\n"
	if _, err := alice.UploadReader(ctx, strings.NewReader(in), int64(len(in)), "job/in.txt", nil); err != nil {
		t.Fatal(err)
	}
	cs := startCompute(t, upstream, func(c *computeserver.Config) { c.DataServer = addr })
	cred, err := key.MintTask("alice", "t-1", 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	stage := &computev1.StageInAction{Files: []string{"job/in.txt"}}
	dag := host("", &computev1.Action{Id: "stage", Kind: &computev1.Action_StageIn{StageIn: stage}},
		&computev1.Action{Id: "run", After: []string{"stage"}, Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{
			Argv: []string{"sh", "-c", "{ cat /root/work/in/job/in.txt; echo done; } > /root/work/out/r.txt"}}}})
	req := &computev1.CreateVMRequest{VmId: "vm-stage", Image: "tiny", Owner: "alice", Config: dag}
	if _, _, err := create(ctx, cs.plants, req); code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "data_credential") {
		t.Fatalf("stage_in without a credential: %v", err)
	}
	req.DataCredential = cred
	stage.Dataserver = "127.0.0.1:1"
	if _, _, err := create(ctx, cs.plants, req); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "stage_in.dataserver") {
		t.Fatalf("stage_in naming a data server: %v", err)
	}
	stage.Dataserver = ""
	ad, _, err := create(ctx, cs.plants, req)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.plants.DestroyVM(ctx, &computev1.DestroyVMRequest{VmId: ad.VmId})
	out, err := cs.plants.StageOut(ctx, &computev1.StageOutRequest{VmId: ad.VmId, RemotePrefix: "tasks/t-1/out"})
	if err != nil || len(out.GetUploaded()) != 1 || out.Uploaded[0] != "tasks/t-1/out/r.txt" {
		t.Fatalf("stage-out: %v %v", out, err)
	}
	var b strings.Builder
	if _, err := alice.ReadRange(ctx, "tasks/t-1/out/r.txt", 0, 0, &b); err != nil || b.String() != in+"done\n" {
		t.Fatalf("the task's output: %q %v", b.String(), err)
	}
	if _, err := cs.plants.StageOut(ctx, &computev1.StageOutRequest{VmId: ad.VmId, RemotePrefix: "elsewhere"}); code(err) != codes.PermissionDenied {
		t.Fatalf("stage-out outside the task's prefix: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(cs.dir, "vms", ad.VmId, "classad.json")); err != nil || strings.Contains(string(b), cred) {
		t.Fatalf("classad.json: %v, or the credential is in it", err)
	}
}

// dyingDriver runs real QEMU and kills it (SIGKILL) as soon as the restored
// guest runs, as a guest that died of a kernel panic or an OOM kill would.
type dyingDriver struct{ vmm.Driver }

type dyingMachine struct{ vmm.Machine }

func (d dyingDriver) Start(ctx context.Context, spec vmm.Spec) (vmm.Machine, error) {
	m, err := d.Driver.Start(ctx, spec)
	if err != nil {
		return nil, err
	}
	return dyingMachine{m}, nil
}

func (m dyingMachine) Resume(ctx context.Context) error {
	if err := m.Machine.Resume(ctx); err != nil {
		return err
	}
	return syscall.Kill(m.Pid(), syscall.SIGKILL)
}
