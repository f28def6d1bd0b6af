package shop

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Tasks (Goiri et al.): a VM with the owner's input files staged in on a
// data disk, the command run in it, its output folder staged out to the
// data server — also when the command failed — and the VM destroyed.
//
// A task lives in etcd (/vmgrid/tasks/ID). The shop that runs it holds a
// claim (/vmgrid/taskclaims/ID) under its session lease; every shop looks
// for unclaimed unfinished tasks every few seconds, so a task whose shop
// died is taken over. A taken-over task re-runs its command (at least once).
// A run is a list of named steps (taskSteps).

// WorkDir is the task's working directory in the guest: in/ holds the
// inputs, out/ is staged out.
const WorkDir = "/root/work"

// TaskID is the task id of an owner's request.
func TaskID(owner, requestID string) string {
	h := sha256.Sum256([]byte("task\x00" + owner + "\x00" + requestID))
	return "task-" + hex.EncodeToString(h[:5])
}

func terminal(s shopv1.TaskState) bool {
	return s == shopv1.TaskState_TASK_STATE_SUCCEEDED || s == shopv1.TaskState_TASK_STATE_FAILED || s == shopv1.TaskState_TASK_STATE_CANCELED
}

// taskRunner runs tasks: its shop's and those of dead shops.
type taskRunner struct {
	store  taskStore
	claims vmStore
	vms    *vms
	log    *zap.Logger

	mu      sync.Mutex
	running map[string]bool
	stop    context.CancelFunc
	done    chan struct{}
}

// startTaskRunner runs tasks until close, adopting unclaimed ones every 3 s.
func startTaskRunner(store *etcdStore, v *vms, log *zap.Logger) *taskRunner {
	ctx, cancel := context.WithCancel(context.Background())
	r := &taskRunner{store: store, claims: store, vms: v, log: log,
		running: map[string]bool{}, stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		t := time.NewTicker(3 * time.Second)
		defer t.Stop()
		for {
			r.adopt(ctx)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return r
}

func (r *taskRunner) close() {
	r.stop()
	<-r.done
}

// adopt starts every unfinished task nobody runs.
func (r *taskRunner) adopt(ctx context.Context) {
	tasks, err := r.store.tasks(ctx)
	if err != nil {
		return
	}
	for _, t := range tasks {
		if !terminal(t.State) {
			r.start(ctx, t.TaskId)
		}
	}
}

// start runs a task here unless this or another shop runs it.
func (r *taskRunner) start(ctx context.Context, id string) {
	r.mu.Lock()
	if r.running[id] {
		r.mu.Unlock()
		return
	}
	r.running[id] = true
	r.mu.Unlock()
	go func() {
		defer func() { r.mu.Lock(); delete(r.running, id); r.mu.Unlock() }()
		claim := claimsPrefix + id
		if ok, _, err := r.claims.claim(ctx, claim); err != nil || !ok {
			return // another shop runs it
		}
		defer r.claims.release(claim)
		r.run(ctx, id)
	}()
}

// errTaskOver stops a run quietly: the task was canceled (or ended) meanwhile.
var errTaskOver = errors.New("the task is over")

// taskRun is one run of a task, passed from step to step.
type taskRun struct {
	r    *taskRunner
	id   string
	spec *shopv1.SubmitTaskRequest
	log  *zap.Logger

	rec       *record // the task's VM
	destroyed bool
	plant     computev1.PlantServiceClient
	exec      *computev1.ExecVMResponse
	execErr   error
	out       *computev1.StageOutResponse
	outErr    error
}

// taskStep is a named step of a run; a step's error fails the task.
type taskStep struct {
	name string
	do   func(*taskRun, context.Context) error
}

// taskSteps is a run, in order. Whatever happens after the VM is made, it
// is destroyed before the task's end is recorded, so a client that sees
// the end finds no VM left.
var taskSteps = []taskStep{
	{"validate", (*taskRun).validate},
	{"stage in", (*taskRun).stageIn},
	{"start", (*taskRun).startVM},
	{"run", (*taskRun).runCommand},
	{"stage out", (*taskRun).stageOut},
}

// run drives a task to its end.
func (r *taskRunner) run(ctx context.Context, id string) {
	t, _, err := r.store.task(ctx, id)
	if err != nil || terminal(t.State) {
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go r.cancelWith(ctx, id, cancel)
	run := &taskRun{r: r, id: id, spec: t.Spec, log: r.log.With(zap.String("task", id))}
	defer run.destroyVM()
	for _, step := range taskSteps {
		if err := step.do(run, ctx); err != nil {
			if !errors.Is(err, errTaskOver) {
				run.fail(fmt.Errorf("%s: %w", step.name, err))
			}
			return
		}
	}
	run.finish()
}

// cancelWith cancels a run when its task is canceled or deleted.
func (r *taskRunner) cancelWith(ctx context.Context, id string, cancel context.CancelFunc) {
	_, rev, err := r.store.task(ctx, id)
	if err != nil {
		return
	}
	_ = r.store.watchTask(ctx, id, rev, func(t *shopv1.Task) (bool, error) {
		if t == nil || t.State == shopv1.TaskState_TASK_STATE_CANCELED {
			cancel()
			return true, nil
		}
		return false, nil
	})
}

// setState records a step's state; errTaskOver if the task ended meanwhile.
func (tr *taskRun) setState(ctx context.Context, change func(*shopv1.Task)) error {
	if _, ok, err := tr.r.store.updateTask(ctx, tr.id, change); err != nil || !ok {
		return errTaskOver
	}
	return nil
}

// validate checks the task before a VM is made for it (a task adopted from
// another shop was checked by a shop that may be older).
func (tr *taskRun) validate(context.Context) error {
	if err := tr.spec.Validate(); err != nil {
		return fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	return checkOutputPrefix(tr.id, tr.spec.OutputPrefix)
}

// stageIn creates the task's VM with the inputs on its data disk.
func (tr *taskRun) stageIn(ctx context.Context) error {
	if err := tr.setState(ctx, func(t *shopv1.Task) { t.State = shopv1.TaskState_TASK_STATE_STAGING_IN }); err != nil {
		return err
	}
	// No data server named: the plant stages with the one the grid gave it.
	stage := &computev1.Action{Id: "stage_in", Kind: &computev1.Action_StageIn{StageIn: &computev1.StageInAction{
		Files: tr.spec.Inputs, MountPath: WorkDir}}}
	t, _, err := tr.r.store.task(ctx, tr.id)
	if err != nil {
		return err
	}
	ad, err := tr.r.vms.create(ctx, t.Owner, &shopv1.CreateVMRequest{RequestId: tr.id, Hardware: tr.spec.Hardware, Image: tr.spec.Image,
		Config: &computev1.ConfigDAG{Actions: []*computev1.Action{stage}}}, func(*shopv1.CreateVMProgress) {})
	if err != nil {
		return err
	}
	if tr.rec, _, err = tr.r.claims.vm(ctx, ad.VmId); err != nil {
		return fmt.Errorf("the task's VM vanished: %w", err)
	}
	return nil
}

// startVM records the VM and connects to its plant.
func (tr *taskRun) startVM(ctx context.Context) error {
	if err := tr.setState(ctx, func(t *shopv1.Task) {
		t.State, t.VmId, t.Plant = shopv1.TaskState_TASK_STATE_RUNNING, tr.rec.VMID, tr.rec.Plant
	}); err != nil {
		return err
	}
	var err error
	if tr.plant, err = tr.r.vms.plants.get(tr.rec.PlantAddr); err != nil {
		return fmt.Errorf("plant %s: %w", tr.rec.Plant, err)
	}
	return nil
}

// runCommand runs the command; its failure is the task's outcome, not the
// run's (the outputs are staged out regardless).
func (tr *taskRun) runCommand(ctx context.Context) error {
	timeout := tr.spec.TimeoutSeconds
	if timeout == 0 {
		timeout = 3600
	}
	tr.exec, tr.execErr = tr.plant.ExecVM(ctx, &computev1.ExecVMRequest{VmId: tr.rec.VMID, Exec: &computev1.ExecAction{
		Argv: []string{"sh", "-c", tr.spec.Command}, Dir: WorkDir, TimeoutSeconds: timeout}})
	if ctx.Err() != nil {
		return errTaskOver // canceled
	}
	return nil
}

// stageOut copies out/ to the data server, also when the command failed.
func (tr *taskRun) stageOut(ctx context.Context) error {
	if err := tr.setState(ctx, func(t *shopv1.Task) { t.State = shopv1.TaskState_TASK_STATE_STAGING_OUT }); err != nil {
		return err
	}
	prefix := tr.spec.OutputPrefix
	if prefix == "" {
		prefix = auth.TaskOutputPrefix(tr.id) + "out"
	}
	// A fresh credential: the command may have outlived the creation's.
	cred, err := tr.r.vms.cfg.mint(tr.rec.Owner, tr.id)
	if err != nil {
		tr.outErr = err
		return nil
	}
	tr.out, tr.outErr = tr.plant.StageOut(ctx, &computev1.StageOutRequest{VmId: tr.rec.VMID, Folder: "out", RemotePrefix: prefix, DataCredential: cred})
	return nil
}

// destroyVM destroys the task's VM, once.
func (tr *taskRun) destroyVM() {
	if tr.rec == nil || tr.destroyed {
		return
	}
	tr.destroyed = true
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := tr.r.vms.destroy(ctx, tr.rec); err != nil {
		tr.log.Warn("destroy the task's VM", zap.Error(err))
	}
}

// fail ends the task as failed.
func (tr *taskRun) fail(err error) {
	tr.destroyVM()
	tr.log.Warn("task failed", zap.Error(err))
	tr.r.store.updateTask(context.Background(), tr.id, func(t *shopv1.Task) {
		t.State, t.Error, t.FinishedUnixNano = shopv1.TaskState_TASK_STATE_FAILED, err.Error(), time.Now().UnixNano()
	})
}

// finish records the task's outcome: the command's and the stage-out's.
func (tr *taskRun) finish() {
	tr.destroyVM()
	tr.r.store.updateTask(context.Background(), tr.id, func(t *shopv1.Task) {
		t.FinishedUnixNano = time.Now().UnixNano()
		if tr.out != nil {
			t.Outputs = tr.out.Uploaded
		}
		var errs []string
		if tr.execErr != nil {
			errs = append(errs, "running: "+tr.execErr.Error())
			t.ExitCode = -1
		} else {
			t.ExitCode, t.StderrTail, t.StdoutTail = tr.exec.ExitCode, string(tailBytes(tr.exec.Stderr, 4096)), string(tailBytes(tr.exec.Stdout, 4096))
			if tr.exec.Error != "" {
				errs = append(errs, tr.exec.Error)
			}
		}
		if tr.outErr != nil {
			errs = append(errs, "staging out: "+tr.outErr.Error())
		}
		t.Error = strings.Join(errs, "; ")
		t.State = shopv1.TaskState_TASK_STATE_FAILED
		if t.ExitCode == 0 && len(errs) == 0 {
			t.State = shopv1.TaskState_TASK_STATE_SUCCEEDED
		}
	})
	tr.log.Info("task finished", zap.Int32("exit_code", tr.exec.GetExitCode()))
}

// submitTask records a task (a retry finds the same) and starts it here
// when this shop runs tasks.
func submitTask(ctx context.Context, store taskStore, runner *taskRunner, owner string, req *shopv1.SubmitTaskRequest) (*shopv1.Task, error) {
	id := TaskID(owner, req.RequestId)
	if err := checkOutputPrefix(id, req.OutputPrefix); err != nil {
		return nil, err
	}
	t := &shopv1.Task{TaskId: id, Owner: owner, State: shopv1.TaskState_TASK_STATE_QUEUED, Spec: req, SubmittedUnixNano: time.Now().UnixNano()}
	old, err := store.createTask(ctx, t)
	if err != nil {
		return nil, err
	}
	if old != nil { // a retry: the same task
		return old, nil
	}
	if runner != nil {
		runner.start(context.WithoutCancel(ctx), id)
	}
	return t, nil
}

// cancelTask cancels a task that has not ended.
func cancelTask(ctx context.Context, store taskStore, id string) (*shopv1.Task, error) {
	t, ok, err := store.updateTask(ctx, id, func(t *shopv1.Task) {
		t.State, t.Error, t.FinishedUnixNano = shopv1.TaskState_TASK_STATE_CANCELED, "canceled by its owner", time.Now().UnixNano()
	})
	if err != nil {
		return nil, err
	}
	if !ok {
		return t, fmt.Errorf("task %q already ended (%s): %w", id, t.State, errdefs.ErrFailedPrecondition)
	}
	return t, nil
}

// watchTask sends every change of t after rev until it ends.
func watchTask(ctx context.Context, store taskStore, t *shopv1.Task, rev int64, send func(*shopv1.Task) error) error {
	return store.watchTask(ctx, t.TaskId, rev, func(nt *shopv1.Task) (bool, error) {
		if nt == nil {
			return true, fmt.Errorf("task %s was deleted while watched: %w", t.TaskId, errdefs.ErrNotFound)
		}
		if proto.Equal(nt, t) {
			return false, nil
		}
		t = nt
		return terminal(t.State), send(t)
	})
}
