package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// Client talks to an agent through the host end of its virtio-serial port
// (a unix socket QEMU serves). Requests may be in flight at once: one
// reader hands each response to the call (or stream) with its ID.
type Client struct {
	conn net.Conn
	wmu  sync.Mutex // one request line at a time

	mu      sync.Mutex
	next    uint64
	pending map[uint64]*waiter
	err     error         // why the reader ended; set before done closes
	done    chan struct{} // closed when the connection is gone
}

// ErrClosed is returned for calls on a Client whose connection is gone.
var ErrClosed = errors.New("agent connection closed")

// streamBuffer is how many responses of one stream wait for their reader
// before the connection's reader waits too (back-pressure to the guest).
const streamBuffer = 256

// Dial connects to the agent's socket, retrying until ctx ends (QEMU creates
// the socket shortly after it starts).
func Dial(ctx context.Context, socket string) (*Client, error) {
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", socket)
		if err == nil {
			return newClient(conn), nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("agent socket %s: %w", socket, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// waiter is a call or stream waiting for responses; gone closes when it
// stops waiting, so the reader never blocks on a channel nobody reads.
type waiter struct {
	ch   chan *Response
	gone chan struct{}
}

func newClient(conn net.Conn) *Client {
	c := &Client{conn: conn, pending: map[uint64]*waiter{}, done: make(chan struct{})}
	go c.read()
	return c
}

// read hands every response to its caller until the connection fails.
func (c *Client) read() {
	r := bufio.NewReaderSize(c.conn, 1<<20)
	var err error
	for {
		var line []byte
		if line, err = r.ReadBytes('\n'); err != nil {
			break
		}
		var resp Response
		if json.Unmarshal(line, &resp) != nil {
			continue // noise on the port (e.g. before the agent started)
		}
		c.mu.Lock()
		w := c.pending[resp.ID]
		if !resp.More {
			delete(c.pending, resp.ID)
		}
		c.mu.Unlock()
		if w != nil {
			select {
			case w.ch <- &resp:
			case <-w.gone:
			}
		}
	}
	c.mu.Lock()
	c.err = fmt.Errorf("%w: %w", ErrClosed, err)
	c.mu.Unlock()
	close(c.done)
}

// send registers a response channel of size buf for a new ID and writes
// req with it.
func (c *Client) send(req *Request, buf int) (*waiter, error) {
	w := &waiter{ch: make(chan *Response, buf), gone: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.next++
	req.ID = c.next
	c.pending[req.ID] = w
	c.mu.Unlock()
	if err := c.write(req); err != nil {
		c.forget(req.ID, w)
		return nil, err
	}
	return w, nil
}

func (c *Client) write(req *Request) error {
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err = c.conn.Write(append(b, '\n'))
	return err
}

// forget stops waiting for id's responses.
func (c *Client) forget(id uint64, w *waiter) {
	c.mu.Lock()
	if c.pending[id] == w {
		delete(c.pending, id)
	}
	c.mu.Unlock()
	select {
	case <-w.gone:
	default:
		close(w.gone)
	}
}

// closedErr is why the connection is gone.
func (c *Client) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// ErrNoAnswer is the cause of a call the agent did not answer in time
// (AnswerBound): the guest is stuck, or its agent is.
var ErrNoAnswer = errors.New("the guest agent did not answer")

// AnswerBound is how long Do waits for an answer: a request's own timeout
// (which the agent enforces in the guest) and answerGrace, or
// untimedBound for requests without one. A frozen guest thus fails its
// caller with ErrNoAnswer instead of holding it forever.
func AnswerBound(req Request) time.Duration {
	if req.Timeout > 0 {
		return time.Duration(req.Timeout) + answerGrace
	}
	return untimedBound
}

var ( // tests shorten them
	answerGrace  = 30 * time.Second
	untimedBound = 5 * time.Minute
)

// WithAnswerBound bounds ctx by AnswerBound(req); when the bound ends it,
// context.Cause is ErrNoAnswer (and context.DeadlineExceeded).
func WithAnswerBound(ctx context.Context, req Request) (context.Context, context.CancelFunc) {
	bound := AnswerBound(req)
	return context.WithTimeoutCause(ctx, bound, fmt.Errorf("%w to %s in %v: %w", ErrNoAnswer, req.Op, bound, context.DeadlineExceeded))
}

// Do sends a request and waits for its response, at most AnswerBound.
func (c *Client) Do(ctx context.Context, req Request) (*Response, error) {
	ctx, cancel := WithAnswerBound(ctx, req)
	defer cancel()
	w, err := c.send(&req, 1)
	if err != nil {
		return nil, err
	}
	select {
	case resp := <-w.ch:
		return resp, nil
	case <-ctx.Done():
		c.forget(req.ID, w)
		return nil, context.Cause(ctx)
	case <-c.done:
		// The response may have arrived just before the connection went.
		select {
		case resp := <-w.ch:
			return resp, nil
		default:
			return nil, c.closedErr()
		}
	}
}

// WaitReady pings until the agent answers or ctx ends.
func (c *Client) WaitReady(ctx context.Context) error {
	for {
		pctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		_, err := c.Do(pctx, Request{Op: OpPing})
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("agent did not answer: %w", ctx.Err())
		}
		if errors.Is(err, ErrClosed) {
			return err
		}
	}
}

// Done is closed when the connection to the agent is gone.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }
