package imageclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// BlockStream is one ReadBlocks stream shared by many goroutines: every Read
// is sent at once and answered when its blocks arrive, so concurrent readers
// keep many requests in flight on one stream.
type BlockStream struct {
	stream imagev1.ImageService_ReadBlocksClient
	cancel context.CancelFunc
	accept imagev1.Compression
	dec    *zstd.Decoder

	sendMu sync.Mutex
	mu     sync.Mutex
	next   uint64
	wait   map[uint64]*pendingRead
	err    error // set when the stream broke
	done   chan struct{}
}

type pendingRead struct {
	first   uint64
	results []blockproto.BlockResult
	left    int
	err     error
	ch      chan struct{}
}

// OpenBlockStream opens a ReadBlocks stream. With compress set the server may
// answer zstd-compressed blocks (worth it on slow links).
func (c *Client) OpenBlockStream(ctx context.Context, compress bool) (*BlockStream, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := c.API.ReadBlocks(ctx)
	if err != nil {
		cancel()
		return nil, err
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0))
	if err != nil {
		cancel()
		return nil, err
	}
	s := &BlockStream{stream: stream, cancel: cancel, dec: dec, wait: map[uint64]*pendingRead{}, done: make(chan struct{})}
	if compress {
		s.accept = imagev1.Compression_COMPRESSION_ZSTD
	}
	go s.recvLoop()
	return s, nil
}

func (s *BlockStream) recvLoop() {
	defer close(s.done)
	for {
		resp, err := s.stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("block stream closed: %w", errdefs.ErrUnavailable)
			}
			s.fail(err)
			return
		}
		s.mu.Lock()
		p := s.wait[resp.Tag]
		s.mu.Unlock()
		if p == nil {
			continue
		}
		if resp.Error != nil {
			p.err = errdefs.FromGRPC(status.Error(codes.Code(resp.Error.Code), resp.Error.Message))
			s.finish(resp.Tag, p)
			continue
		}
		r := blockproto.BlockResult{Block: resp.Block, Zero: resp.Zero, Length: resp.Length, Digest: resp.Digest}
		if !resp.Zero {
			r.Data = resp.Data
			if resp.Compression == imagev1.Compression_COMPRESSION_ZSTD {
				r.Data, err = s.dec.DecodeAll(resp.Data, make([]byte, 0, resp.Length))
				if err != nil {
					p.err = fmt.Errorf("block %d: corrupt compressed data: %w", resp.Block, errdefs.ErrDataLoss)
				}
			}
			if p.err == nil && len(r.Data) != int(resp.Length) {
				p.err = fmt.Errorf("block %d: %d bytes, expected %d: %w", resp.Block, len(r.Data), resp.Length, errdefs.ErrDataLoss)
			}
		}
		if idx := resp.Block - p.first; idx < uint64(len(p.results)) && p.results[idx].Length == 0 {
			p.results[idx] = r
			p.left--
		}
		if p.left == 0 || p.err != nil {
			s.finish(resp.Tag, p)
		}
	}
}

func (s *BlockStream) finish(tag uint64, p *pendingRead) {
	s.mu.Lock()
	if s.wait[tag] == p {
		delete(s.wait, tag)
		close(p.ch)
	}
	s.mu.Unlock()
}

func (s *BlockStream) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = err
	}
	for tag, p := range s.wait {
		p.err = s.err
		close(p.ch)
		delete(s.wait, tag)
	}
}

// Read asks for count blocks from block on and waits for all of them. It is
// safe to call from many goroutines; their requests are pipelined.
func (s *BlockStream) Read(ctx context.Context, image, file string, block uint64, count uint32) ([]blockproto.BlockResult, error) {
	count = max(count, 1)
	p := &pendingRead{first: block, results: make([]blockproto.BlockResult, count), left: int(count), ch: make(chan struct{})}
	s.mu.Lock()
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return nil, err
	}
	s.next++
	tag := s.next
	s.wait[tag] = p
	s.mu.Unlock()
	s.sendMu.Lock()
	err := s.stream.Send(&imagev1.ReadBlocksRequest{Tag: tag, Image: image, File: file, Block: block, Count: count, Accept: s.accept})
	s.sendMu.Unlock()
	if err != nil {
		s.finish(tag, p)
		if errors.Is(err, io.EOF) { // the stream ended; the receiver has the reason
			<-s.done
			s.mu.Lock()
			err = s.err
			s.mu.Unlock()
		}
		return nil, err
	}
	select {
	case <-p.ch:
	case <-ctx.Done():
		s.finish(tag, p)
		return nil, ctx.Err()
	}
	if p.err != nil {
		return nil, p.err
	}
	return p.results, nil
}

// Close ends the stream.
func (s *BlockStream) Close() error {
	s.sendMu.Lock()
	_ = s.stream.CloseSend()
	s.sendMu.Unlock()
	s.cancel()
	<-s.done
	s.dec.Close()
	return nil
}

// Err is the error that broke the stream, or nil while it works.
func (s *BlockStream) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}
