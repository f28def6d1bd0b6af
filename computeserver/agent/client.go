package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sync"
	"time"
)

// Client talks to an agent through the host end of its virtio-serial port
// (a unix socket QEMU serves).
type Client struct {
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
	next uint64
}

// Dial connects to the agent's socket, retrying until ctx ends (QEMU creates
// the socket shortly after it starts).
func Dial(ctx context.Context, socket string) (*Client, error) {
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", socket)
		if err == nil {
			return &Client{conn: conn, r: bufio.NewReaderSize(conn, 1<<20)}, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("agent socket %s: %w", socket, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Do sends a request and waits for its response.
func (c *Client) Do(ctx context.Context, req Request) (*Response, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.next++
	req.ID = c.next
	if dl, ok := ctx.Deadline(); ok {
		c.conn.SetDeadline(dl)
	} else {
		c.conn.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	b, err := json.Marshal(&req)
	if err != nil {
		return nil, err
	}
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return nil, c.ctxErr(ctx, err)
	}
	for {
		line, err := c.r.ReadBytes('\n')
		if err != nil {
			return nil, c.ctxErr(ctx, err)
		}
		var resp Response
		if err := json.Unmarshal(line, &resp); err != nil {
			continue // noise on the port (e.g. before the agent started)
		}
		if resp.ID == req.ID {
			return &resp, nil
		}
	}
}

func (c *Client) ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
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
	}
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }
