package imageserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/klauspost/compress/zstd"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// The read side of ImageService is served the same way by every tier (the
// image server over its store, a cache proxy over its caches): these
// functions hold the streaming logic, the tiers provide the files.

// BlockSource is an open file that can be read block by block.
type BlockSource interface {
	Meta() *imagev1.FileMeta
	// ReadBlock reads one block into buf (a MaxBlockSize buffer).
	ReadBlock(ctx context.Context, index uint64, buf []byte) (Block, error)
	// ReadRange reads [off, off+len(buf)) and reports whether it is all zero
	// (then buf need not be filled).
	ReadRange(ctx context.Context, off uint64, buf []byte) (zero bool, err error)
}

// SourceOpener resolves an image's file. valid reports whether a source
// opened earlier on the same stream may still be used.
type SourceOpener interface {
	OpenSource(ctx context.Context, image, file string) (BlockSource, error)
	Valid(src BlockSource) bool
}

// ReadCounters receives what ServeReadBlocks answered; nil is fine.
type ReadCounters interface {
	Block(result string, payload int)
}

// readWorkers read blocks in parallel for one ReadBlocks stream, so a
// pipelined client keeps the disk and the wire busy at once.
var readWorkers = max(4, runtime.NumCPU())

var bufPool = sync.Pool{New: func() any { b := make([]byte, MaxBlockSize); return &b }}

// ServeReadBlocks answers a ReadBlocks stream: one goroutine receives and
// fans requests out, several read, one sends. A request for a missing file or
// past the end is answered in-band and the stream goes on.
func ServeReadBlocks(stream imagev1.ImageService_ReadBlocksServer, open SourceOpener, enc *zstd.Encoder, counters ReadCounters) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	type job struct {
		tag    uint64
		src    BlockSource
		block  uint64
		accept imagev1.Compression
	}
	// buf, when set, backs resp.Data and goes back to the pool after Send.
	type outMsg struct {
		resp *imagev1.ReadBlocksResponse
		buf  *[]byte
	}
	jobs := make(chan job, 256)
	out := make(chan outMsg, 256)

	recvErr := make(chan error, 1)
	go func() {
		defer close(jobs)
		sources := map[[2]string]BlockSource{}
		for {
			req, err := stream.Recv()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					recvErr <- err
				}
				return
			}
			key := [2]string{req.Image, req.File}
			src := sources[key]
			if src == nil || !open.Valid(src) {
				if src, err = open.OpenSource(ctx, req.Image, req.File); err != nil {
					select {
					case out <- outMsg{resp: errorResponse(req.Tag, req.Block, err)}:
					case <-ctx.Done():
						return
					}
					continue
				}
				sources[key] = src
			}
			for i := uint64(0); i < uint64(max(req.Count, 1)); i++ {
				select {
				case jobs <- job{tag: req.Tag, src: src, block: req.Block + i, accept: req.Accept}:
				case <-ctx.Done():
					return
				}
			}
		}
	}()

	var wg sync.WaitGroup
	for range readWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				bp := bufPool.Get().(*[]byte)
				b, err := j.src.ReadBlock(ctx, j.block, *bp)
				msg := outMsg{buf: bp}
				switch {
				case err != nil:
					msg.resp = errorResponse(j.tag, j.block, err)
				case b.Zero:
					msg.resp = &imagev1.ReadBlocksResponse{Tag: j.tag, Block: j.block, Zero: true, Length: b.Length, Digest: b.Digest}
				default:
					msg.resp = &imagev1.ReadBlocksResponse{Tag: j.tag, Block: j.block, Data: b.Data, Length: b.Length, Digest: b.Digest}
					if j.accept == imagev1.Compression_COMPRESSION_ZSTD && enc != nil {
						if c := enc.EncodeAll(b.Data, nil); len(c) < len(b.Data)*7/8 {
							msg.resp.Data, msg.resp.Compression = c, imagev1.Compression_COMPRESSION_ZSTD
						}
					}
				}
				if msg.resp.Data == nil || msg.resp.Compression != imagev1.Compression_COMPRESSION_NONE || !sameBuf(msg.resp.Data, *bp) {
					bufPool.Put(bp) // the response does not point into the buffer
					msg.buf = nil
				}
				select {
				case out <- msg:
				case <-ctx.Done():
				}
			}
		}()
	}
	go func() { wg.Wait(); close(out) }()

	// The only goroutine that calls stream.Send.
	var sendErr error
	for msg := range out {
		resp := msg.resp
		if sendErr == nil {
			// Counted before Send: a client that has received a block
			// always finds it in the counters.
			if counters != nil {
				switch {
				case resp.Error != nil:
					counters.Block("error", 0)
				case resp.Zero:
					counters.Block("zero", 0)
				default:
					counters.Block("data", len(resp.Data))
				}
			}
			if sendErr = stream.Send(resp); sendErr != nil {
				cancel()
			}
		}
		if msg.buf != nil { // Send has serialized the message
			bufPool.Put(msg.buf)
		}
	}
	if sendErr != nil {
		return sendErr
	}
	select {
	case err := <-recvErr:
		return err
	default:
		return nil
	}
}

func sameBuf(a, b []byte) bool { return len(a) > 0 && len(b) > 0 && &a[0] == &b[0] }

func errorResponse(tag, block uint64, err error) *imagev1.ReadBlocksResponse {
	return &imagev1.ReadBlocksResponse{Tag: tag, Block: block, Error: &imagev1.Error{Code: uint32(errdefs.Code(err)), Message: err.Error()}}
}

// FrameSource is a BlockSource that holds its chunks compressed already
// (see chunks.go).
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
	frames, _ := src.(FrameSource)
	return inOrder(stream.Context(), n, max(2, runtime.NumCPU()), func(ctx context.Context, i uint64) (*imagev1.FetchFileResponse, error) {
		off := req.Offset + i*cs
		n := min(cs, meta.Size-off)
		if frames != nil {
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
	}, func(r *imagev1.FetchFileResponse) error {
		if sent != nil { // before Send, as in ServeReadBlocks
			sent(len(r.Data))
		}
		return stream.Send(r)
	})
}

// inOrder runs work(0..n-1) on up to workers goroutines and hands the
// results to use in index order, a window of futures keeping the workers
// ahead of use; it stops at the first error of either, or when ctx ends.
func inOrder[T any](ctx context.Context, n uint64, workers int, work func(context.Context, uint64) (T, error), use func(T) error) error {
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
