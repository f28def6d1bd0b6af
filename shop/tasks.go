package shop

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"google.golang.org/protobuf/encoding/protojson"
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
const (
	tasksPrefix  = "/vmgrid/tasks/"
	claimsPrefix = "/vmgrid/taskclaims/"
	// WorkDir is the task's working directory in the guest: in/ holds the
	// inputs, out/ is staged out.
	WorkDir = "/root/work"
)

// TaskID is the task id of an owner's request.
func TaskID(owner, requestID string) string {
	h := sha256.Sum256([]byte("task\x00" + owner + "\x00" + requestID))
	return "task-" + hex.EncodeToString(h[:5])
}

func terminal(s shopv1.TaskState) bool {
	return s == shopv1.TaskState_TASK_STATE_SUCCEEDED || s == shopv1.TaskState_TASK_STATE_FAILED || s == shopv1.TaskState_TASK_STATE_CANCELED
}

type taskRunner struct {
	s       *Shop
	sess    *concurrency.Session
	mu      sync.Mutex
	running map[string]bool
	stop    context.CancelFunc
	done    chan struct{}
}

// startTasks runs tasks until Close: its own and those of dead shops.
func (s *Shop) startTasks() error {
	ctx, cancel := context.WithCancel(context.Background())
	r := &taskRunner{s: s, sess: s.session, running: map[string]bool{}, stop: cancel, done: make(chan struct{})}
	s.tasks = r
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
	return nil
}

// Close stops running tasks here (other shops take them over).
func (s *Shop) Close() {
	if s.tasks != nil {
		s.tasks.stop()
		<-s.tasks.done
	}
	if s.market != nil {
		s.market.Close()
	}
	s.session.Close()
	s.mu.Lock()
	for _, cc := range s.conns {
		cc.Close()
	}
	s.mu.Unlock()
}

// adopt starts every unfinished task nobody runs.
func (r *taskRunner) adopt(ctx context.Context) {
	resp, err := r.s.cfg.Etcd.Get(ctx, tasksPrefix, clientv3.WithPrefix())
	if err != nil {
		return
	}
	for _, kv := range resp.Kvs {
		t := &shopv1.Task{}
		if protojson.Unmarshal(kv.Value, t) == nil && !terminal(t.State) {
			r.start(ctx, t.TaskId)
		}
	}
}

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
		txn, err := r.s.cfg.Etcd.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(claim), "=", 0)).
			Then(clientv3.OpPut(claim, "", clientv3.WithLease(r.sess.Lease()))).Commit()
		if err != nil || !txn.Succeeded {
			return // another shop runs it
		}
		defer r.s.cfg.Etcd.Delete(context.Background(), claim)
		r.s.runTask(ctx, id)
	}()
}

func (s *Shop) getTask(ctx context.Context, id string) (*shopv1.Task, int64, error) {
	resp, err := s.cfg.Etcd.Get(ctx, tasksPrefix+id)
	if err != nil {
		return nil, 0, fmt.Errorf("etcd: %v: %w", err, errdefs.ErrUnavailable)
	}
	if len(resp.Kvs) == 0 {
		return nil, resp.Header.Revision, fmt.Errorf("task %q: %w", id, errdefs.ErrNotFound)
	}
	t := &shopv1.Task{}
	if err := protojson.Unmarshal(resp.Kvs[0].Value, t); err != nil {
		return nil, 0, err
	}
	return t, resp.Header.Revision, nil
}

// update changes a task unless it was canceled meanwhile; it reports false
// when the task is over (canceled).
func (s *Shop) update(ctx context.Context, id string, change func(*shopv1.Task)) (*shopv1.Task, bool, error) {
	for {
		resp, err := s.cfg.Etcd.Get(ctx, tasksPrefix+id)
		if err != nil || len(resp.Kvs) == 0 {
			return nil, false, fmt.Errorf("task %s: %v", id, err)
		}
		t := &shopv1.Task{}
		if err := protojson.Unmarshal(resp.Kvs[0].Value, t); err != nil {
			return nil, false, err
		}
		if terminal(t.State) {
			return t, false, nil
		}
		change(t)
		b, _ := protojson.Marshal(t)
		txn, err := s.cfg.Etcd.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(tasksPrefix+id), "=", resp.Kvs[0].ModRevision)).
			Then(clientv3.OpPut(tasksPrefix+id, string(b))).Commit()
		if err != nil {
			return nil, false, err
		}
		if txn.Succeeded {
			return t, true, nil
		}
	}
}

// runTask drives a task to its end.
func (s *Shop) runTask(ctx context.Context, id string) {
	log := s.log.With(zap.String("task", id))
	t, _, err := s.getTask(ctx, id)
	if err != nil || terminal(t.State) {
		return
	}
	// Cancel follows the task's record.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		for resp := range s.cfg.Etcd.Watch(ctx, tasksPrefix+id) {
			for _, ev := range resp.Events {
				nt := &shopv1.Task{}
				if ev.Type == clientv3.EventTypeDelete || protojson.Unmarshal(ev.Kv.Value, nt) == nil && nt.State == shopv1.TaskState_TASK_STATE_CANCELED {
					cancel()
					return
				}
			}
		}
	}()
	var destroyVM func()
	fail := func(format string, args ...any) {
		if destroyVM != nil {
			destroyVM()
		}
		msg := fmt.Sprintf(format, args...)
		log.Warn("task failed", zap.String("error", msg))
		s.update(context.Background(), id, func(t *shopv1.Task) {
			t.State, t.Error, t.FinishedUnixNano = shopv1.TaskState_TASK_STATE_FAILED, msg, time.Now().UnixNano()
		})
	}
	spec := t.Spec
	if _, ok, _ := s.update(ctx, id, func(t *shopv1.Task) { t.State = shopv1.TaskState_TASK_STATE_STAGING_IN }); !ok {
		return
	}
	stage := &computev1.Action{Id: "stage_in", Kind: &computev1.Action_StageIn{StageIn: &computev1.StageInAction{
		Dataserver: s.cfg.DataServer, Files: spec.Inputs, MountPath: WorkDir}}}
	ad, err := s.create(ctx, t.Owner, &shopv1.CreateVMRequest{RequestId: id, Hardware: spec.Hardware, Image: spec.Image,
		Config: &computev1.ConfigDAG{Actions: []*computev1.Action{stage}}}, func(*shopv1.CreateVMProgress) {})
	if err != nil {
		fail("staging in: %v", err)
		return
	}
	rec, _, err := s.getRecord(ctx, ad.VmId)
	if err != nil {
		fail("the task's VM vanished: %v", err)
		return
	}
	// Whatever happens from here, the VM goes (before the task's end is
	// reported, so a client that sees the end finds no VM left).
	destroyed := false
	destroy := func() {
		if destroyed {
			return
		}
		destroyed = true
		dctx, dcancel := context.WithTimeout(context.Background(), time.Minute)
		defer dcancel()
		if err := s.destroy(dctx, rec); err != nil {
			log.Warn("destroy the task's VM", zap.Error(err))
		}
	}
	defer destroy()
	destroyVM = destroy
	if _, ok, _ := s.update(ctx, id, func(t *shopv1.Task) {
		t.State, t.VmId, t.Plant = shopv1.TaskState_TASK_STATE_RUNNING, ad.VmId, ad.Plant
	}); !ok {
		return
	}
	plant, err := s.plant(rec.PlantAddr)
	if err != nil {
		fail("plant %s: %v", rec.Plant, err)
		return
	}
	timeout := spec.TimeoutSeconds
	if timeout == 0 {
		timeout = 3600
	}
	run, runErr := plant.ExecVM(ctx, &computev1.ExecVMRequest{VmId: ad.VmId, Exec: &computev1.ExecAction{
		Argv: []string{"sh", "-c", spec.Command}, Dir: WorkDir, TimeoutSeconds: timeout}})
	if ctx.Err() != nil {
		return // canceled
	}
	// Stage out whatever the command left, also when it failed.
	if _, ok, _ := s.update(ctx, id, func(t *shopv1.Task) { t.State = shopv1.TaskState_TASK_STATE_STAGING_OUT }); !ok {
		return
	}
	prefix := spec.OutputPrefix
	if prefix == "" {
		prefix = "tasks/" + id + "/out"
	}
	out, outErr := plant.StageOut(ctx, &computev1.StageOutRequest{VmId: ad.VmId, Folder: "out", RemotePrefix: prefix})
	destroy()
	s.update(context.Background(), id, func(t *shopv1.Task) {
		t.FinishedUnixNano = time.Now().UnixNano()
		if out != nil {
			t.Outputs = out.Uploaded
		}
		var errs []string
		switch {
		case runErr != nil:
			errs = append(errs, "running: "+runErr.Error())
			t.ExitCode = -1
		default:
			t.ExitCode, t.StderrTail, t.StdoutTail = run.ExitCode, tailString(run.Stderr, 4096), tailString(run.Stdout, 4096)
			if run.Error != "" {
				errs = append(errs, run.Error)
			}
		}
		if outErr != nil {
			errs = append(errs, "staging out: "+outErr.Error())
		}
		t.Error = strings.Join(errs, "; ")
		if t.ExitCode == 0 && len(errs) == 0 {
			t.State = shopv1.TaskState_TASK_STATE_SUCCEEDED
		} else {
			t.State = shopv1.TaskState_TASK_STATE_FAILED
		}
	})
	log.Info("task finished", zap.Int32("exit_code", run.GetExitCode()))
}

func tailString(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// SubmitTask implements ShopService.SubmitTask.
func (s *Shop) SubmitTask(ctx context.Context, req *shopv1.SubmitTaskRequest) (*shopv1.Task, error) {
	owner, err := auth.Owner(ctx)
	if err != nil {
		return nil, err
	}
	if s.cfg.DataServer == "" {
		return nil, fmt.Errorf("this shop has no data server (--dataserver), so it runs no tasks: %w", errdefs.ErrFailedPrecondition)
	}
	id := TaskID(owner, req.RequestId)
	t := &shopv1.Task{TaskId: id, Owner: owner, State: shopv1.TaskState_TASK_STATE_QUEUED, Spec: req, SubmittedUnixNano: time.Now().UnixNano()}
	b, _ := protojson.Marshal(t)
	txn, err := s.cfg.Etcd.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(tasksPrefix+id), "=", 0)).
		Then(clientv3.OpPut(tasksPrefix+id, string(b))).Else(clientv3.OpGet(tasksPrefix + id)).Commit()
	if err != nil {
		return nil, fmt.Errorf("etcd: %v: %w", err, errdefs.ErrUnavailable)
	}
	if !txn.Succeeded { // a retry: the same task
		kvs := txn.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 1 {
			old := &shopv1.Task{}
			if protojson.Unmarshal(kvs[0].Value, old) == nil {
				return old, nil
			}
		}
	}
	if s.tasks != nil {
		s.tasks.start(context.WithoutCancel(ctx), id)
	}
	return t, nil
}

func (s *Shop) ownedTask(ctx context.Context, id string) (*shopv1.Task, int64, error) {
	owner, err := auth.Owner(ctx)
	if err != nil {
		return nil, 0, err
	}
	t, rev, err := s.getTask(ctx, id)
	if err != nil {
		return nil, 0, err
	}
	if t.Owner != owner {
		return nil, 0, fmt.Errorf("task %q belongs to another owner: %w", id, errdefs.ErrPermissionDenied)
	}
	return t, rev, nil
}

// GetTask implements ShopService.GetTask.
func (s *Shop) GetTask(ctx context.Context, req *shopv1.GetTaskRequest) (*shopv1.Task, error) {
	t, _, err := s.ownedTask(ctx, req.TaskId)
	return t, err
}

// CancelTask implements ShopService.CancelTask.
func (s *Shop) CancelTask(ctx context.Context, req *shopv1.GetTaskRequest) (*shopv1.Task, error) {
	if _, _, err := s.ownedTask(ctx, req.TaskId); err != nil {
		return nil, err
	}
	t, ok, err := s.update(ctx, req.TaskId, func(t *shopv1.Task) {
		t.State, t.Error, t.FinishedUnixNano = shopv1.TaskState_TASK_STATE_CANCELED, "canceled by its owner", time.Now().UnixNano()
	})
	if err != nil {
		return nil, err
	}
	if !ok {
		return t, fmt.Errorf("task %q already ended (%s): %w", req.TaskId, t.State, errdefs.ErrFailedPrecondition)
	}
	return t, nil
}

// WatchTask implements ShopService.WatchTask.
func (s *Shop) WatchTask(req *shopv1.GetTaskRequest, stream shopv1.ShopService_WatchTaskServer) error {
	ctx := stream.Context()
	t, rev, err := s.ownedTask(ctx, req.TaskId)
	if err != nil {
		return err
	}
	if err := stream.Send(t); err != nil || terminal(t.State) {
		return err
	}
	for resp := range s.cfg.Etcd.Watch(clientv3.WithRequireLeader(ctx), tasksPrefix+req.TaskId, clientv3.WithRev(rev+1)) {
		if err := resp.Err(); err != nil {
			return fmt.Errorf("etcd watch: %v: %w", err, errdefs.ErrUnavailable)
		}
		for _, ev := range resp.Events {
			nt := &shopv1.Task{}
			if ev.Type == clientv3.EventTypeDelete {
				return fmt.Errorf("task %s was deleted while watched: %w", req.TaskId, errdefs.ErrNotFound)
			}
			if protojson.Unmarshal(ev.Kv.Value, nt) != nil || proto.Equal(nt, t) {
				continue
			}
			t = nt
			if err := stream.Send(t); err != nil || terminal(t.State) {
				return err
			}
		}
	}
	return ctx.Err()
}
