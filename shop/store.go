package shop

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/encoding/protojson"

	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/market"
)

// etcd keys of the VM information system.
const (
	vmsPrefix      = "/vmgrid/vms/"
	requestsPrefix = "/vmgrid/requests/"
	drivingPrefix  = "/vmgrid/driving/"
	tasksPrefix    = "/vmgrid/tasks/"
	claimsPrefix   = "/vmgrid/taskclaims/"
	// ordersPrefix holds destroy orders for lost VMs: ordersPrefix/PLANT/VM.
	ordersPrefix = "/vmgrid/destroy-orders/"
)

// vmStore keeps VM records and the request records that make CreateVM
// idempotent.
type vmStore interface {
	// createRequest records a new request and its VM in one transaction;
	// for a known request id it returns the request record instead.
	createRequest(ctx context.Context, r *record) (*requestRecord, error)
	vm(ctx context.Context, id string) (*record, int64, error)
	putVM(ctx context.Context, r *record) error
	vms(ctx context.Context) ([]*record, error)
	// putRequest writes a VM record and its request record, both under a
	// lease of ttl (they expire), or without one (ttl 0).
	putRequest(ctx context.Context, r *record, ttl time.Duration) error
	// remove deletes a VM record and its request record.
	remove(ctx context.Context, r *record) error
	// watchVM calls each with every change of a VM's record after rev until
	// each says stop or ctx ends; a deleted record comes as nil.
	watchVM(ctx context.Context, id string, rev int64, each func(*record) (bool, error)) error
	// claim makes this shop the holder of key (a driver or task claim)
	// while it lives; else it reports the revision it saw the holder at.
	claim(ctx context.Context, key string) (bool, int64, error)
	release(key string)
	// claimed reports which of the keys under prefix are held.
	claimed(ctx context.Context, prefix string) (map[string]bool, error)
	waitReleased(ctx context.Context, key string, rev int64)
	// orderDestroy leaves the destroy of a lost VM to its plant's return;
	// orderDone removes an order (its key under ordersPrefix) carried out.
	orderDestroy(ctx context.Context, plant, vmID string) error
	orderDone(ctx context.Context, key string) error
}

// taskStore keeps tasks.
type taskStore interface {
	createTask(ctx context.Context, t *shopv1.Task) (*shopv1.Task, error)
	task(ctx context.Context, id string) (*shopv1.Task, int64, error)
	tasks(ctx context.Context) ([]*shopv1.Task, error)
	// updateTask applies change unless the task ended meanwhile (then it
	// returns false).
	updateTask(ctx context.Context, id string, change func(*shopv1.Task)) (*shopv1.Task, bool, error)
	watchTask(ctx context.Context, id string, rev int64, each func(*shopv1.Task) (bool, error)) error
}

// etcdStore is both stores in etcd. Every call has a deadline
// (market.OpTimeout) and fails as Unavailable.
type etcdStore struct {
	cli  *clientv3.Client
	sess *market.Session
}

var (
	_ vmStore   = (*etcdStore)(nil)
	_ taskStore = (*etcdStore)(nil)
)

// etcdErr maps a failed etcd call to Unavailable. The cause is kept in the
// message only: etcd's client returns gRPC status errors (DeadlineExceeded,
// Canceled), and wrapping them would make errdefs report their codes.
func etcdErr(err error) error {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, rpctypes.ErrTimeout) {
		// What a caller sees when a cluster lost its quorum: say so.
		return fmt.Errorf("etcd did not answer within %s (unreachable, or its cluster has no quorum); retry later: %w", market.OpTimeout, errdefs.ErrUnavailable)
	}
	return fmt.Errorf("etcd: %s: %w", err, errdefs.ErrUnavailable)
}

func op(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, market.OpTimeout)
}

func (s *etcdStore) get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	ctx, cancel := op(ctx)
	defer cancel()
	resp, err := s.cli.Get(ctx, key, opts...)
	if err != nil {
		return nil, etcdErr(err)
	}
	return resp, nil
}

func (s *etcdStore) txn(ctx context.Context, cmp []clientv3.Cmp, then, els []clientv3.Op) (*clientv3.TxnResponse, error) {
	ctx, cancel := op(ctx)
	defer cancel()
	resp, err := s.cli.Txn(ctx).If(cmp...).Then(then...).Else(els...).Commit()
	if err != nil {
		return nil, etcdErr(err)
	}
	return resp, nil
}

func requestKey(owner, requestID string) string { return requestsPrefix + owner + "/" + requestID }

func (s *etcdStore) createRequest(ctx context.Context, r *record) (*requestRecord, error) {
	key := requestKey(r.Owner, r.RequestID)
	rr := jsonString(requestRecord{VMID: r.VMID, Hash: r.RequestHash})
	txn, err := s.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)},
		[]clientv3.Op{clientv3.OpPut(key, rr), clientv3.OpPut(vmsPrefix+r.VMID, string(r.encode()))},
		[]clientv3.Op{clientv3.OpGet(key)})
	if err != nil || txn.Succeeded {
		return nil, err
	}
	kvs := txn.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 { // expired in between
		return s.createRequest(ctx, r)
	}
	known := decodeRequest(kvs[0].Value)
	return &known, nil
}

func (s *etcdStore) vm(ctx context.Context, id string) (*record, int64, error) {
	resp, err := s.get(ctx, vmsPrefix+id)
	if err != nil {
		return nil, 0, err
	}
	if len(resp.Kvs) == 0 {
		return nil, resp.Header.Revision, fmt.Errorf("vm %q: %w", id, errdefs.ErrNotFound)
	}
	r, err := decodeRecord(resp.Kvs[0].Value)
	if err != nil {
		return nil, 0, fmt.Errorf("vm %q: %w: %w", id, err, errdefs.ErrDataLoss)
	}
	return r, resp.Header.Revision, nil
}

func (s *etcdStore) putVM(ctx context.Context, r *record) error {
	_, err := s.txn(ctx, nil, []clientv3.Op{clientv3.OpPut(vmsPrefix+r.VMID, string(r.encode()))}, nil)
	return err
}

func (s *etcdStore) vms(ctx context.Context) ([]*record, error) {
	resp, err := s.get(ctx, vmsPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	var out []*record
	for _, kv := range resp.Kvs {
		if r, err := decodeRecord(kv.Value); err == nil {
			out = append(out, r)
		}
	}
	return out, nil
}

func (s *etcdStore) putRequest(ctx context.Context, r *record, ttl time.Duration) error {
	var opts []clientv3.OpOption
	if ttl > 0 {
		gctx, cancel := op(ctx)
		lease, err := s.cli.Grant(gctx, int64(ttl/time.Second)+1)
		cancel()
		if err != nil {
			return etcdErr(err)
		}
		opts = append(opts, clientv3.WithLease(lease.ID))
	}
	rr := jsonString(requestRecord{VMID: r.VMID, Hash: r.RequestHash})
	_, err := s.txn(ctx, nil, []clientv3.Op{
		clientv3.OpPut(requestKey(r.Owner, r.RequestID), rr, opts...),
		clientv3.OpPut(vmsPrefix+r.VMID, string(r.encode()), opts...),
	}, nil)
	return err
}

func (s *etcdStore) remove(ctx context.Context, r *record) error {
	ops := []clientv3.Op{clientv3.OpDelete(vmsPrefix + r.VMID)}
	if r.RequestID != "" {
		ops = append(ops, clientv3.OpDelete(requestKey(r.Owner, r.RequestID)))
	}
	_, err := s.txn(ctx, nil, ops, nil)
	return err
}

func (s *etcdStore) watchVM(ctx context.Context, id string, rev int64, each func(*record) (bool, error)) error {
	return s.watch(ctx, vmsPrefix+id, rev, func(v []byte) (bool, error) {
		if v == nil {
			return each(nil)
		}
		r, err := decodeRecord(v)
		if err != nil {
			return false, nil
		}
		return each(r)
	})
}

// watch calls each with the values of key after rev (nil: deleted).
func (s *etcdStore) watch(ctx context.Context, key string, rev int64, each func([]byte) (bool, error)) error {
	for resp := range s.cli.Watch(clientv3.WithRequireLeader(ctx), key, clientv3.WithRev(rev+1)) {
		if err := resp.Err(); err != nil {
			return fmt.Errorf("etcd watch: %w: %w", err, errdefs.ErrUnavailable)
		}
		for _, ev := range resp.Events {
			var v []byte
			if ev.Type == clientv3.EventTypePut {
				v = ev.Kv.Value
			}
			if stop, err := each(v); stop || err != nil {
				return err
			}
		}
	}
	return ctx.Err()
}

func (s *etcdStore) claim(ctx context.Context, key string) (bool, int64, error) {
	for attempt := 0; ; attempt++ {
		sess, err := s.sess.Get(ctx)
		if err != nil {
			return false, 0, etcdErr(err)
		}
		txn, err := s.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)},
			[]clientv3.Op{clientv3.OpPut(key, "", clientv3.WithLease(sess.Lease()))}, nil)
		if err != nil && market.IsLeaseLost(err) && attempt == 0 {
			s.sess.Lost(sess) // etcd forgot the lease (an outage): take a new one
			continue
		}
		if err != nil {
			return false, 0, err
		}
		return txn.Succeeded, txn.Header.Revision, nil
	}
}

func (s *etcdStore) release(key string) {
	ctx, cancel := op(context.Background())
	defer cancel()
	s.cli.Delete(ctx, key) // else it goes with the session's lease
}

func (s *etcdStore) claimed(ctx context.Context, prefix string) (map[string]bool, error) {
	resp, err := s.get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, err
	}
	out := make(map[string]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out[string(kv.Key)] = true
	}
	return out, nil
}

// waitReleased waits (at most 5 s) until key is deleted after rev.
func (s *etcdStore) waitReleased(ctx context.Context, key string, rev int64) {
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_ = s.watch(wctx, key, rev, func(v []byte) (bool, error) { return v == nil, nil })
}

func (s *etcdStore) createTask(ctx context.Context, t *shopv1.Task) (*shopv1.Task, error) {
	key := tasksPrefix + t.TaskId
	b, _ := protojson.Marshal(t)
	txn, err := s.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)},
		[]clientv3.Op{clientv3.OpPut(key, string(b))}, []clientv3.Op{clientv3.OpGet(key)})
	if err != nil || txn.Succeeded {
		return nil, err
	}
	if kvs := txn.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 {
		old := &shopv1.Task{}
		if protojson.Unmarshal(kvs[0].Value, old) == nil {
			return old, nil
		}
	}
	return nil, nil
}

func (s *etcdStore) task(ctx context.Context, id string) (*shopv1.Task, int64, error) {
	resp, err := s.get(ctx, tasksPrefix+id)
	if err != nil {
		return nil, 0, err
	}
	if len(resp.Kvs) == 0 {
		return nil, resp.Header.Revision, fmt.Errorf("task %q: %w", id, errdefs.ErrNotFound)
	}
	t := &shopv1.Task{}
	if err := protojson.Unmarshal(resp.Kvs[0].Value, t); err != nil {
		return nil, 0, fmt.Errorf("task %q: %w: %w", id, err, errdefs.ErrDataLoss)
	}
	return t, resp.Kvs[0].ModRevision, nil
}

func (s *etcdStore) tasks(ctx context.Context) ([]*shopv1.Task, error) {
	resp, err := s.get(ctx, tasksPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	var out []*shopv1.Task
	for _, kv := range resp.Kvs {
		t := &shopv1.Task{}
		if protojson.Unmarshal(kv.Value, t) == nil {
			out = append(out, t)
		}
	}
	return out, nil
}

func (s *etcdStore) updateTask(ctx context.Context, id string, change func(*shopv1.Task)) (*shopv1.Task, bool, error) {
	for {
		t, rev, err := s.task(ctx, id)
		if err != nil {
			return nil, false, err
		}
		if terminal(t.State) {
			return t, false, nil
		}
		change(t)
		b, _ := protojson.Marshal(t)
		key := tasksPrefix + id
		txn, err := s.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)},
			[]clientv3.Op{clientv3.OpPut(key, string(b))}, nil)
		if err != nil {
			return nil, false, err
		}
		if txn.Succeeded {
			return t, true, nil
		}
	}
}

func (s *etcdStore) watchTask(ctx context.Context, id string, rev int64, each func(*shopv1.Task) (bool, error)) error {
	return s.watch(ctx, tasksPrefix+id, rev, func(v []byte) (bool, error) {
		if v == nil {
			return each(nil)
		}
		t := &shopv1.Task{}
		if protojson.Unmarshal(v, t) != nil {
			return false, nil
		}
		return each(t)
	})
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
