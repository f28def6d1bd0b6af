package imageclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/klauspost/compress/zstd"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// ChunkFunc receives a FetchFile chunk: data holds length uncompressed bytes,
// or is nil when the chunk is all zero.
type ChunkFunc func(off uint64, length uint32, data []byte) error

// Backoff is how long FetchFile waits before it resumes a broken stream:
// First before the first retry, doubling up to Max, and no retry once the
// waits would add up to more than Total. An image server that restarts
// gets time to come back; one that is gone fails the call in bounded time.
type Backoff struct {
	First, Max, Total time.Duration
}

// DefaultBackoff is the Backoff of a Client that sets none.
var DefaultBackoff = Backoff{First: 100 * time.Millisecond, Max: 2 * time.Second, Total: 10 * time.Second}

// wait returns the pause before retry number attempt (1, 2, …) given the
// time already waited, and false when the budget is spent.
func (b Backoff) wait(attempt int, waited time.Duration) (time.Duration, bool) {
	d := b.First
	for i := 1; i < attempt && d < b.Max; i++ {
		d *= 2
	}
	d = min(d, b.Max)
	return d, waited+d <= b.Total
}

func (c *Client) backoff() Backoff {
	if c.Backoff == (Backoff{}) {
		return DefaultBackoff
	}
	return c.Backoff
}

// FetchFile streams a whole file through the compressed channel, calling fn
// for every chunk in order from offset on, and resumes after a broken stream
// (Unavailable) from the last chunk delivered, up to retries times, waiting
// between attempts as c.Backoff says.
func (c *Client) FetchFile(ctx context.Context, image, file string, offset uint64, retries int, fn ChunkFunc) error {
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
	if err != nil {
		return err
	}
	defer dec.Close()
	b := c.backoff()
	var waited time.Duration
	for attempt := 1; ; attempt++ {
		var done bool
		offset, done, err = c.fetchOnce(ctx, dec, image, file, offset, fn)
		if done || err == nil {
			return err
		}
		if attempt > retries || !errdefs.IsUnavailable(err) || ctx.Err() != nil {
			return err
		}
		d, ok := b.wait(attempt, waited)
		if !ok {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
		}
		waited += d
	}
}

// fetchOnce runs one FetchFile stream from offset and returns where it
// stopped. done is set when the error must not be retried (fn's or corrupt
// data); a nil error means the file is complete.
func (c *Client) fetchOnce(ctx context.Context, dec *zstd.Decoder, image, file string, offset uint64, fn ChunkFunc) (next uint64, done bool, err error) {
	stream, err := c.API.FetchFile(ctx, &imagev1.FetchFileRequest{Image: image, File: file, Offset: offset})
	if err != nil {
		return offset, false, err
	}
	var buf []byte
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return offset, true, nil
		}
		if err != nil {
			return offset, false, err
		}
		var data []byte
		if !resp.Zero {
			if buf, err = decodeChunk(dec, resp, buf[:0]); err != nil {
				return offset, true, err
			}
			data = buf
		}
		if err := fn(resp.Offset, resp.Length, data); err != nil {
			return offset, true, err
		}
		offset = resp.Offset + uint64(resp.Length)
	}
}

func decodeChunk(dec *zstd.Decoder, resp *imagev1.FetchFileResponse, buf []byte) ([]byte, error) {
	buf, err := dec.DecodeAll(resp.Data, buf)
	if err != nil {
		return buf, fmt.Errorf("chunk at %d: corrupt compressed data: %w", resp.Offset, errdefs.ErrDataLoss)
	}
	if len(buf) != int(resp.Length) {
		return buf, fmt.Errorf("chunk at %d: %d bytes, expected %d: %w", resp.Offset, len(buf), resp.Length, errdefs.ErrDataLoss)
	}
	return buf, nil
}
