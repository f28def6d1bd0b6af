package vmm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/services"
)

// QMPError is an error answer from QEMU's monitor.
type QMPError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *QMPError) Error() string { return "qmp: " + e.Class + ": " + e.Desc }

// ErrQMPClosed is returned for commands on a monitor connection that QEMU
// closed (it exited) or that Close closed.
var ErrQMPClosed = errors.New("qmp: connection closed")

// QMP is a client of QEMU's machine protocol: JSON objects, one per line.
// After the greeting and qmp_capabilities, each command is answered by a
// return or an error, in order; asynchronous events may arrive at any time
// and are logged and skipped. Commands are serialised; every command carries
// an id, so an answer to a command whose caller gave up (ctx) is recognised
// and dropped instead of being taken for the next command's answer.
type QMP struct {
	conn *net.UnixConn
	log  *zap.Logger

	mu     sync.Mutex // one command in flight
	nextID uint64

	replies   chan qmpMessage // answers, read by the reader goroutine
	closing   chan struct{}   // closed by Close
	closeOnce sync.Once
	done      chan struct{} // closed when the reader stops
	err       error         // why the reader stopped; valid after done
}

type qmpMessage struct {
	Greeting  json.RawMessage `json:"QMP"`
	Return    json.RawMessage `json:"return"`
	Error     *QMPError       `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	ID        *uint64         `json:"id"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// DialQMP connects to the monitor socket at path, reads the greeting and
// enters command mode (qmp_capabilities).
func DialQMP(ctx context.Context, path string, log *zap.Logger) (*QMP, error) {
	log = services.LoggerOr(log)
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	conn := c.(*net.UnixConn)
	q := &QMP{conn: conn, log: log, replies: make(chan qmpMessage, 1), closing: make(chan struct{}), done: make(chan struct{})}
	r := bufio.NewReaderSize(conn, 64<<10)

	// The greeting comes first and alone.
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetReadDeadline(dl)
	}
	line, err := r.ReadBytes('\n')
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp greeting: %w", err)
	}
	var greet qmpMessage
	if err := json.Unmarshal(line, &greet); err != nil || greet.Greeting == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp greeting: unexpected %q", line)
	}
	_ = conn.SetReadDeadline(time.Time{})

	go q.read(r)
	if err := q.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

func (q *QMP) read(r *bufio.Reader) {
	defer close(q.done)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			q.err = err
			return
		}
		var m qmpMessage
		if err := json.Unmarshal(line, &m); err != nil {
			q.log.Warn("qmp: undecodable message", zap.ByteString("line", line), zap.Error(err))
			continue
		}
		if m.Event != "" {
			q.log.Debug("qmp event", zap.String("event", m.Event), zap.ByteString("data", m.Data))
			continue
		}
		select {
		case q.replies <- m:
		case <-q.closing:
			q.err = ErrQMPClosed
			return
		}
	}
}

// Close closes the connection; commands in flight fail with ErrQMPClosed.
func (q *QMP) Close() error {
	var err error
	q.closeOnce.Do(func() {
		close(q.closing)
		err = q.conn.Close()
	})
	<-q.done
	return err
}

// Execute runs command with args (marshalled to JSON; nil for none) and
// decodes the return value into result (nil to ignore it).
func (q *QMP) Execute(ctx context.Context, command string, args, result any) error {
	return q.execute(ctx, command, args, result, -1)
}

// execute is Execute that, when fd >= 0, passes that open file descriptor
// along with the command (SCM_RIGHTS), as getfd expects.
func (q *QMP) execute(ctx context.Context, command string, args, result any, fd int) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	select {
	case <-q.done:
		return ErrQMPClosed
	default:
	}
	q.nextID++
	id := q.nextID
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{command, args, id}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	b = append(b, '\n')
	if dl, ok := ctx.Deadline(); ok {
		_ = q.conn.SetWriteDeadline(dl)
		defer q.conn.SetWriteDeadline(time.Time{})
	}
	if fd >= 0 {
		_, _, err = q.conn.WriteMsgUnix(b, syscall.UnixRights(fd), nil)
	} else {
		_, err = q.conn.Write(b)
	}
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	for {
		select {
		case m := <-q.replies:
			if m.ID == nil || *m.ID != id {
				continue // the answer to a command whose caller gave up
			}
			if m.Error != nil {
				return fmt.Errorf("qmp %s: %w", command, m.Error)
			}
			if result != nil && m.Return != nil {
				if err := json.Unmarshal(m.Return, result); err != nil {
					return fmt.Errorf("qmp %s: decode %s: %w", command, m.Return, err)
				}
			}
			return nil
		case <-q.done:
			return fmt.Errorf("qmp %s: %w", command, ErrQMPClosed)
		case <-ctx.Done():
			return fmt.Errorf("qmp %s: %w", command, ctx.Err())
		}
	}
}

// StatusInfo is the answer of query-status.
type StatusInfo struct {
	Status  string `json:"status"` // running, paused, inmigrate, postmigrate, shutdown, …
	Running bool   `json:"running"`
}

// QueryStatus returns the run state of the machine.
func (q *QMP) QueryStatus(ctx context.Context) (StatusInfo, error) {
	var s StatusInfo
	err := q.Execute(ctx, "query-status", nil, &s)
	return s, err
}

// Stop pauses the guest's vCPUs.
func (q *QMP) Stop(ctx context.Context) error { return q.Execute(ctx, "stop", nil, nil) }

// Cont resumes the guest's vCPUs.
func (q *QMP) Cont(ctx context.Context) error { return q.Execute(ctx, "cont", nil, nil) }

// Quit asks QEMU to exit. QEMU may close the connection before its answer
// is read; that counts as success.
func (q *QMP) Quit(ctx context.Context) error {
	err := q.Execute(ctx, "quit", nil, nil)
	if errors.Is(err, ErrQMPClosed) {
		return nil
	}
	return err
}

// MigrateSetParameters sets migration parameters, e.g. "max-bandwidth"
// (bytes per second).
func (q *QMP) MigrateSetParameters(ctx context.Context, params map[string]any) error {
	return q.Execute(ctx, "migrate-set-parameters", params, nil)
}

// MigrateSetCapabilities turns migration capabilities on or off, e.g.
// "x-ignore-shared". Source and destination must agree.
func (q *QMP) MigrateSetCapabilities(ctx context.Context, caps map[string]bool) error {
	return q.Execute(ctx, "migrate-set-capabilities", capabilitiesArgs(caps), nil)
}

// capabilitiesArgs are migrate-set-capabilities' arguments for caps.
func capabilitiesArgs(caps map[string]bool) map[string]any {
	type capability struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	var list []capability
	for c, on := range caps {
		list = append(list, capability{c, on})
	}
	return map[string]any{"capabilities": list}
}

// Migrate starts an outgoing migration to uri ("exec:…", "fd:NAME",
// "tcp:…"); it returns at once, poll with QueryMigrate or WaitMigration.
func (q *QMP) Migrate(ctx context.Context, uri string) error {
	return q.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil)
}

// MigrateIncoming starts the incoming side of a machine started with
// -incoming defer.
func (q *QMP) MigrateIncoming(ctx context.Context, uri string) error {
	return q.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil)
}

// GetFD hands the monitor an open file descriptor under name, for a later
// "fd:NAME" migration URI. QEMU duplicates it; the caller keeps its own.
func (q *QMP) GetFD(ctx context.Context, name string, fd int) error {
	return q.execute(ctx, "getfd", map[string]any{"fdname": name}, nil, fd)
}

// MigrationInfo is the answer of query-migrate (the fields used here).
type MigrationInfo struct {
	Status    string `json:"status"` // none, setup, active, completed, failed, cancelled, …
	ErrorDesc string `json:"error-desc"`
	TotalTime int64  `json:"total-time"` // ms
	Downtime  int64  `json:"downtime"`   // ms
	SetupTime int64  `json:"setup-time"` // ms
	RAM       *struct {
		Transferred int64 `json:"transferred"`
		Total       int64 `json:"total"`
		Duplicate   int64 `json:"duplicate"` // zero pages, not sent
		Normal      int64 `json:"normal"`    // pages sent
		// Remaining is what is left of this pass (bytes), Mbps the rate
		// the stream goes (megabits per second).
		Remaining int64   `json:"remaining"`
		Mbps      float64 `json:"mbps"`
		// Live migration: passes over dirty memory, pages dirtied per
		// second, pages fetched on demand after a post-copy switch.
		DirtySyncCount   int64 `json:"dirty-sync-count"`
		DirtyPagesRate   int64 `json:"dirty-pages-rate"`
		PostcopyRequests int64 `json:"postcopy-requests"`
	} `json:"ram"`
	// CPU throttle of auto-converge, percent.
	CPUThrottle int64 `json:"cpu-throttle-percentage"`
}

// QueryMigrate returns the state of the current or last migration.
func (q *QMP) QueryMigrate(ctx context.Context) (MigrationInfo, error) {
	var m MigrationInfo
	err := q.Execute(ctx, "query-migrate", nil, &m)
	return m, err
}

// WaitMigration polls query-migrate until the migration completed (nil) or
// failed or was cancelled (an error with QEMU's reason).
func (q *QMP) WaitMigration(ctx context.Context, every time.Duration) (MigrationInfo, error) {
	for {
		m, err := q.QueryMigrate(ctx)
		if err != nil {
			return m, err
		}
		switch m.Status {
		case "completed":
			return m, nil
		case "failed", "cancelled":
			return m, fmt.Errorf("migration %s: %s", m.Status, m.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return m, fmt.Errorf("migration still %s: %w", m.Status, ctx.Err())
		case <-time.After(every):
		}
	}
}
