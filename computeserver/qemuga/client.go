// Package qemuga is a client of the QEMU guest agent (qemu-ga) over the
// virtio-serial port QEMU exposes as a unix socket on the host (a
// Spec.Channel named PortName).
//
// # Protocol
//
// qemu-ga speaks QMP-style JSON: {"execute": CMD, "arguments": {...}}, one
// {"return": ...} or {"error": {"class", "desc"}} line back. A virtio-serial
// port has no connection state: bytes written before the guest opened the
// port are lost, and answers to commands of an earlier, abandoned exchange
// may still come. So a Client first synchronises with guest-sync-delimited
// (a random id, answered after a 0xFF byte that resets the guest's parser)
// and does so again after any error, before the next command.
//
// Only what the plant needs is here: ping, sync, exec (guest-exec and
// guest-exec-status), files (guest-file-open/read/write/close), the clock
// (guest-set-time) and SSH keys (guest-ssh-add-authorized-keys).
package qemuga

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"time"
)

// PortName is the virtio-serial port name qemu-ga opens by default
// (/dev/virtio-ports/org.qemu.guest_agent.0).
const PortName = "org.qemu.guest_agent.0"

// Error is an error qemu-ga answered.
type Error struct {
	Command string
	Class   string `json:"class"`
	Desc    string `json:"desc"`
}

func (e *Error) Error() string { return fmt.Sprintf("qemu-ga %s: %s (%s)", e.Command, e.Desc, e.Class) }

// Client talks to one guest's qemu-ga. Calls are serialised: qemu-ga
// answers one command at a time.
type Client struct {
	mu     sync.Mutex
	conn   net.Conn
	r      *bufio.Reader
	synced bool
}

// Dial connects to the socket QEMU serves the port on, retrying until it
// exists or ctx ends. It does not wait for the guest: see Sync.
func Dial(ctx context.Context, socket string) (*Client, error) {
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", socket)
		if err == nil {
			return &Client{conn: conn, r: bufio.NewReader(conn)}, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("qemu-ga socket %s: %w: %w", socket, err, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Sync waits until qemu-ga answers, resending guest-sync-delimited every
// attempt long (the guest may not have opened its port yet), until ctx ends.
func (c *Client) Sync(ctx context.Context, attempt time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.syncLocked(ctx, attempt)
}

func (c *Client) syncLocked(ctx context.Context, attempt time.Duration) error {
	for wait := attempt; ; wait = min(2*wait, 8*attempt) {
		// Longer each time: a guest slowed down (TCG on a busy host) may
		// answer every attempt just after the next one was sent.
		actx, cancel := context.WithTimeout(ctx, wait)
		err := c.syncOnce(actx)
		cancel()
		if err == nil {
			c.synced = true
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("qemu-ga did not answer guest-sync-delimited: %w: %w", err, ctx.Err())
		}
	}
}

// syncOnce sends one guest-sync-delimited and reads until its answer.
func (c *Client) syncOnce(ctx context.Context) error {
	id := rand.Int64N(1 << 50)
	stop := c.deadline(ctx)
	defer stop()
	cmd, _ := json.Marshal(map[string]any{"execute": "guest-sync-delimited", "arguments": map[string]any{"id": id}})
	// 0xFF first: resets qemu-ga's JSON parser after a partial command.
	if _, err := c.conn.Write(append([]byte{0xff}, append(cmd, '\n')...)); err != nil {
		return err
	}
	for {
		line, err := c.r.ReadBytes('\n')
		if err != nil {
			return err
		}
		// The answer follows a 0xFF; anything before is an old answer.
		if i := bytes.LastIndexByte(line, 0xff); i >= 0 {
			line = line[i+1:]
		}
		var resp struct {
			Return *int64 `json:"return"`
		}
		if json.Unmarshal(bytes.TrimSpace(line), &resp) == nil && resp.Return != nil && *resp.Return == id {
			return nil
		}
	}
}

// deadline makes the connection's reads and writes end with ctx.
func (c *Client) deadline(ctx context.Context) (stop func()) {
	d, ok := ctx.Deadline()
	if !ok {
		d = time.Time{}
	}
	_ = c.conn.SetDeadline(d)
	cancel := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(time.Now()) })
	return func() { cancel(); _ = c.conn.SetDeadline(time.Time{}) }
}

// Call runs one command and decodes its return value into result (nil:
// ignored). A connection not known to be in step is synchronised first.
func (c *Client) Call(ctx context.Context, command string, args, result any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.synced {
		if err := c.syncLocked(ctx, time.Second); err != nil {
			return err
		}
	}
	err := c.callLocked(ctx, command, args, result)
	var qerr *Error
	if err != nil && !errors.As(err, &qerr) {
		c.synced = false // an answer may still come: sync before the next
	}
	return err
}

func (c *Client) callLocked(ctx context.Context, command string, args, result any) error {
	stop := c.deadline(ctx)
	defer stop()
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("qemu-ga %s: %w", command, err)
	}
	line, err := c.r.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("qemu-ga %s: %w", command, err)
	}
	var resp struct {
		Return json.RawMessage `json:"return"`
		Error  *Error          `json:"error"`
	}
	if err := json.Unmarshal(bytes.TrimSpace(bytes.TrimLeft(line, "\xff")), &resp); err != nil {
		return fmt.Errorf("qemu-ga %s: bad answer %q: %w", command, line, err)
	}
	if resp.Error != nil {
		resp.Error.Command = command
		return resp.Error
	}
	if result != nil && len(resp.Return) > 0 {
		if err := json.Unmarshal(resp.Return, result); err != nil {
			return fmt.Errorf("qemu-ga %s: decode %s: %w", command, resp.Return, err)
		}
	}
	return nil
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error { return c.Call(ctx, "guest-ping", nil, nil) }

// SetTime sets the guest's clock (and, where qemu-ga can, its RTC).
func (c *Client) SetTime(ctx context.Context, t time.Time) error {
	return c.Call(ctx, "guest-set-time", map[string]any{"time": t.UnixNano()}, nil)
}

// AddAuthorizedKeys appends keys to user's ~/.ssh/authorized_keys (made
// with the right owner and modes); the user must exist.
func (c *Client) AddAuthorizedKeys(ctx context.Context, user string, keys ...string) error {
	return c.Call(ctx, "guest-ssh-add-authorized-keys", map[string]any{"username": user, "keys": keys}, nil)
}
