package blockproto

import (
	"context"
	"fmt"
	"runtime"

	"github.com/klauspost/compress/zstd"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// FrameSource is a BlockSource that holds its chunks compressed already
// (the image server's publish-time sidecars).
type FrameSource interface {
	// Frame returns the chunk at off as one zstd frame, or zero for an
	// all-zero chunk; ok is false when the source has no such frames.
	Frame(ctx context.Context, off uint64) (frame []byte, zero, ok bool, err error)
}

// ServeFetchFile answers a FetchFile stream: chunks are read (as frames
// compressed at publish when src is a FrameSource that has them, else read
// and compressed) by several workers and sent in order.
func ServeFetchFile(req *imagev1.FetchFileRequest, stream imagev1.ImageService_FetchFileServer, src BlockSource, enc *zstd.Encoder, sent func(int)) error {
	meta := src.Meta()
	cs := uint64(meta.ChunkSize)
	if cs == 0 {
		cs = ChunkSize
	}
	if req.Offset%cs != 0 {
		return fmt.Errorf("offset %d is not a multiple of the chunk size %d; resume from the start of the last chunk received: %w", req.Offset, cs, errdefs.ErrInvalidArgument)
	}
	if req.Offset > meta.Size {
		return fmt.Errorf("offset %d is past the end of %q (%d bytes): %w", req.Offset, meta.Name, meta.Size, errdefs.ErrOutOfRange)
	}
	n := (meta.Size - req.Offset + cs - 1) / cs
	return InOrder(stream.Context(), n, max(2, runtime.NumCPU()), func(ctx context.Context, i uint64) (*imagev1.FetchFileResponse, error) {
		return readChunk(ctx, src, enc, req.Offset+i*cs, cs)
	}, func(r *imagev1.FetchFileResponse) error {
		if sent != nil { // before Send, as in ServeReadBlocks
			sent(len(r.Data))
		}
		return stream.Send(r)
	})
}

// readChunk answers the chunk of up to cs bytes at off: its frame from
// publish when src has one, else read and compressed now.
func readChunk(ctx context.Context, src BlockSource, enc *zstd.Encoder, off, cs uint64) (*imagev1.FetchFileResponse, error) {
	n := min(cs, src.Meta().Size-off)
	if frames, _ := src.(FrameSource); frames != nil {
		frame, zero, ok, err := frames.Frame(ctx, off)
		if err != nil {
			return nil, err
		}
		if ok {
			return &imagev1.FetchFileResponse{Offset: off, Length: uint32(n), Zero: zero, Data: frame}, nil
		}
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := (*bp)[:n]
	zero, err := src.ReadRange(ctx, off, buf)
	if err != nil {
		return nil, err
	}
	r := &imagev1.FetchFileResponse{Offset: off, Length: uint32(n), Zero: zero}
	if !zero {
		r.Data = enc.EncodeAll(buf, make([]byte, 0, n/2))
	}
	return r, nil
}

// InOrder runs work(0..n-1) on up to workers goroutines and hands the
// results to use in index order, a window of futures keeping the workers
// ahead of use; it stops at the first error of either, or when ctx ends.
// FetchFile and the image server's publish-time compression share it.
func InOrder[T any](ctx context.Context, n uint64, workers int, work func(context.Context, uint64) (T, error), use func(T) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		v   T
		err error
	}
	futures := make(chan chan result, workers*2)
	go func() {
		defer close(futures)
		sem := make(chan struct{}, workers)
		for i := range n {
			f := make(chan result, 1)
			select {
			case futures <- f:
			case <-ctx.Done():
				return
			}
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				f <- result{err: ctx.Err()}
				return
			}
			go func() {
				defer func() { <-sem }()
				v, err := work(ctx, i)
				f <- result{v, err}
			}()
		}
	}()
	for f := range futures {
		r := <-f
		if r.err != nil {
			return r.err
		}
		if err := use(r.v); err != nil {
			return err
		}
	}
	return ctx.Err()
}
