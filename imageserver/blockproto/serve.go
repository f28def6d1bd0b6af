package blockproto

import (
	"context"
	"errors"
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

// Block is one block read from a file.
type Block struct {
	Data   []byte // nil when Zero
	Zero   bool
	Length uint32
	Digest []byte
}

// BlockSource is an open file that can be read block by block.
type BlockSource interface {
	Meta() *imagev1.FileMeta
	// ReadBlock reads one block into buf (a MaxBlockSize buffer).
	ReadBlock(ctx context.Context, index uint64, buf []byte) (Block, error)
	// ReadRange reads [off, off+len(buf)) and reports whether it is all zero
	// (then buf need not be filled).
	ReadRange(ctx context.Context, off uint64, buf []byte) (zero bool, err error)
}

// RunStarter is a BlockSource whose blocks may be slow to come (a cache
// proxy's file, read from its own upstream on a miss). ServeReadBlocks
// tells it each request's whole run before its workers read the run's
// blocks one by one, so that the source fetches the run at once: one
// upstream request for the run instead of one per block, and as many
// runs in flight as the client pipelines rather than as many blocks as
// there are workers.
type RunStarter interface {
	StartRun(first uint64, count uint32)
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

// readJob is one block to read for a ReadBlocks stream.
type readJob struct {
	tag    uint64
	src    BlockSource
	block  uint64
	accept imagev1.Compression
}

// outMsg is one answer to send; buf, when set, backs resp.Data and goes
// back to the pool after Send.
type outMsg struct {
	resp *imagev1.ReadBlocksResponse
	buf  *[]byte
}

// ServeReadBlocks answers a ReadBlocks stream: one goroutine receives and
// fans requests out, several read, one sends. A request for a missing file or
// past the end is answered in-band and the stream goes on.
func ServeReadBlocks(stream imagev1.ImageService_ReadBlocksServer, open SourceOpener, enc *zstd.Encoder, counters ReadCounters) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	jobs := make(chan readJob, 256)
	out := make(chan outMsg, 256)
	recvErr := make(chan error, 1)
	go func() {
		defer close(jobs)
		if err := receiveReads(ctx, stream, open, jobs, out); err != nil {
			recvErr <- err
		}
	}()
	var wg sync.WaitGroup
	for range readWorkers {
		wg.Go(func() { readBlocks(ctx, jobs, out, enc) })
	}
	go func() { wg.Wait(); close(out) }()
	if err := sendReads(stream, out, counters, cancel); err != nil {
		return err
	}
	select {
	case err := <-recvErr:
		return err
	default:
		return nil
	}
}

// receiveReads turns the requests of a stream into jobs until the client
// closes its side (nil) or the stream breaks (its error). Sources stay open
// across requests as long as the opener says they are valid.
func receiveReads(ctx context.Context, stream imagev1.ImageService_ReadBlocksServer, open SourceOpener, jobs chan<- readJob, out chan<- outMsg) error {
	sources := map[[2]string]BlockSource{}
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		key := [2]string{req.Image, req.File}
		src := sources[key]
		if src == nil || !open.Valid(src) {
			if src, err = open.OpenSource(ctx, req.Image, req.File); err != nil {
				select {
				case out <- outMsg{resp: errorResponse(req.Tag, req.Block, err)}:
				case <-ctx.Done():
					return nil
				}
				continue
			}
			sources[key] = src
		}
		if rs, ok := src.(RunStarter); ok {
			rs.StartRun(req.Block, max(req.Count, 1))
		}
		for i := uint64(0); i < uint64(max(req.Count, 1)); i++ {
			select {
			case jobs <- readJob{tag: req.Tag, src: src, block: req.Block + i, accept: req.Accept}:
			case <-ctx.Done():
				return nil
			}
		}
	}
}

// readBlocks is one reading worker: it answers jobs until they run out.
func readBlocks(ctx context.Context, jobs <-chan readJob, out chan<- outMsg, enc *zstd.Encoder) {
	for j := range jobs {
		msg := readOne(ctx, j, enc)
		select {
		case out <- msg:
		case <-ctx.Done():
		}
	}
}

// readOne reads one block into a pooled buffer and builds its answer,
// compressed when the client accepts it and it pays.
func readOne(ctx context.Context, j readJob, enc *zstd.Encoder) outMsg {
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
	return msg
}

// sendReads is the only goroutine that calls stream.Send. After a failed
// Send it cancels the stream and drains out, returning the buffers.
func sendReads(stream imagev1.ImageService_ReadBlocksServer, out <-chan outMsg, counters ReadCounters, cancel context.CancelFunc) error {
	var sendErr error
	for msg := range out {
		if sendErr == nil {
			// Counted before Send: a client that has received a block
			// always finds it in the counters.
			count(counters, msg.resp)
			if sendErr = stream.Send(msg.resp); sendErr != nil {
				cancel()
			}
		}
		if msg.buf != nil { // Send has serialized the message
			bufPool.Put(msg.buf)
		}
	}
	return sendErr
}

func count(counters ReadCounters, resp *imagev1.ReadBlocksResponse) {
	switch {
	case counters == nil:
	case resp.Error != nil:
		counters.Block("error", 0)
	case resp.Zero:
		counters.Block("zero", 0)
	default:
		counters.Block("data", len(resp.Data))
	}
}

func sameBuf(a, b []byte) bool { return len(a) > 0 && len(b) > 0 && &a[0] == &b[0] }

func errorResponse(tag, block uint64, err error) *imagev1.ReadBlocksResponse {
	return &imagev1.ReadBlocksResponse{Tag: tag, Block: block, Error: &imagev1.Error{Code: uint32(errdefs.Code(err)), Message: err.Error()}}
}
