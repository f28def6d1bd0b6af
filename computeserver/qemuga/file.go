package qemuga

import (
	"context"
	"errors"
)

// chunk is what one guest-file-write or guest-file-read moves: qemu-ga
// limits a command to 16 MiB of JSON, so stay well under it.
const chunk = 1 << 20

// WriteFile writes data to path in the guest (created or truncated; the
// mode is the guest agent's default, see chmod through Exec).
func (c *Client) WriteFile(ctx context.Context, path string, data []byte) (err error) {
	h, err := c.open(ctx, path, "w")
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, c.closeFile(ctx, h)) }()
	for len(data) > 0 {
		n := min(len(data), chunk)
		var w struct {
			Count int `json:"count"`
		}
		if err := c.Call(ctx, "guest-file-write", map[string]any{"handle": h, "buf-b64": data[:n]}, &w); err != nil {
			return err
		}
		if w.Count <= 0 {
			return errors.New("qemu-ga guest-file-write: wrote nothing")
		}
		data = data[w.Count:]
	}
	return nil
}

// ReadFile reads a whole file of the guest, at most limit bytes.
func (c *Client) ReadFile(ctx context.Context, path string, limit int) (data []byte, err error) {
	h, err := c.open(ctx, path, "r")
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, c.closeFile(ctx, h)) }()
	for len(data) < limit {
		var r struct {
			Count int    `json:"count"`
			Buf   []byte `json:"buf-b64"`
			EOF   bool   `json:"eof"`
		}
		if err := c.Call(ctx, "guest-file-read", map[string]any{"handle": h, "count": min(chunk, limit-len(data))}, &r); err != nil {
			return nil, err
		}
		data = append(data, r.Buf...)
		if r.EOF || r.Count == 0 {
			break
		}
	}
	return data, nil
}

func (c *Client) open(ctx context.Context, path, mode string) (int64, error) {
	var h int64
	err := c.Call(ctx, "guest-file-open", map[string]any{"path": path, "mode": mode}, &h)
	return h, err
}

func (c *Client) closeFile(ctx context.Context, h int64) error {
	return c.Call(ctx, "guest-file-close", map[string]any{"handle": h}, nil)
}
