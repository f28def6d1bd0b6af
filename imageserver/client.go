package imageserver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Client is the Go client of the image warehouse: publishing from local
// files, pipelined block reads and the compressed whole-file channel. It
// works against any server that speaks ImageService (an imageserver or a
// cache proxy).
type Client struct {
	API imagev1.ImageServiceClient
}

// NewClient wraps a connection (made with services.Dial, so errors carry
// errdefs sentinels).
func NewClient(cc grpc.ClientConnInterface) *Client {
	return &Client{API: imagev1.NewImageServiceClient(cc)}
}

// PublishFile is one local file to publish.
type PublishFile struct {
	Name      string
	Path      string
	Kind      imagev1.FileKind
	Policy    imagev1.TransferPolicy // UNSPECIFIED: the server's default for Kind
	BlockSize uint32                 // 0: the server's default
}

// PublishSpec describes an image to publish.
type PublishSpec struct {
	Name       string
	Attributes *imagev1.ImageAttributes
	Files      []PublishFile
}

// Progress is called as data is sent: done and total count non-zero bytes.
type Progress func(done, total uint64)

const publishChunk = 1 << 20

// Publish uploads the files of spec. Holes and all-zero chunks are not sent;
// every file's SHA-256 is computed on the way and checked by the server.
func (c *Client) Publish(ctx context.Context, spec PublishSpec, progress Progress) (*imagev1.PublishResponse, error) {
	h := &imagev1.PublishHeader{Name: spec.Name, Attributes: spec.Attributes}
	files := make([]*os.File, len(spec.Files))
	defer func() {
		for _, f := range files {
			if f != nil {
				f.Close()
			}
		}
	}()
	var total uint64
	for i, pf := range spec.Files {
		f, err := os.Open(pf.Path)
		if err != nil {
			return nil, err
		}
		files[i] = f
		st, err := f.Stat()
		if err != nil {
			return nil, err
		}
		if !st.Mode().IsRegular() {
			return nil, fmt.Errorf("%s is not a regular file", pf.Path)
		}
		total += dataBytes(f, uint64(st.Size()))
		h.Files = append(h.Files, &imagev1.PublishFile{Name: pf.Name, Kind: pf.Kind, Size: uint64(st.Size()), Policy: pf.Policy, BlockSize: pf.BlockSize})
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // an error below ends the stream without a commit: nothing is published
	stream, err := c.API.Publish(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&imagev1.PublishRequest{Msg: &imagev1.PublishRequest_Header{Header: h}}); err != nil {
		return nil, closeAndRecvErr(stream, err)
	}
	var done uint64
	sums := make([][]byte, len(files))
	for i, f := range files {
		sum := sha256.New()
		err := forEachDataChunk(f, h.Files[i].Size, publishChunk, func(off uint64, data []byte, zero bool) error {
			sum.Write(data)
			if zero {
				return nil
			}
			if err := stream.Send(&imagev1.PublishRequest{Msg: &imagev1.PublishRequest_Data{Data: &imagev1.PublishData{FileIndex: uint32(i), Offset: off, Data: data}}}); err != nil {
				return err
			}
			done += uint64(len(data))
			if progress != nil {
				progress(min(done, total), total)
			}
			return nil
		})
		if err != nil {
			return nil, closeAndRecvErr(stream, err)
		}
		sums[i] = sum.Sum(nil)
	}
	if err := stream.Send(&imagev1.PublishRequest{Msg: &imagev1.PublishRequest_Commit{Commit: &imagev1.PublishCommit{FileSha256: sums}}}); err != nil {
		return nil, closeAndRecvErr(stream, err)
	}
	return stream.CloseAndRecv()
}

// closeAndRecvErr prefers the server's reason over a bare io.EOF from Send.
func closeAndRecvErr(stream imagev1.ImageService_PublishClient, err error) error {
	if errors.Is(err, io.EOF) {
		if _, rerr := stream.CloseAndRecv(); rerr != nil {
			return rerr
		}
	}
	return err
}

var zeroChunk = make([]byte, publishChunk)

// forEachDataChunk walks a file in chunk-sized pieces, calling fn with the
// bytes (holes come as shared zero slices with zero set; chunks read as all
// zero also have zero set). Data is read once.
func forEachDataChunk(f *os.File, size uint64, chunk int, fn func(off uint64, data []byte, zero bool) error) error {
	buf := make([]byte, chunk)
	fd := int(f.Fd())
	for off := uint64(0); off < size; {
		d, err := unix.Seek(fd, int64(off), unix.SEEK_DATA)
		dataStart := uint64(d)
		if errors.Is(err, unix.ENXIO) {
			dataStart = size
		} else if err != nil {
			return err
		}
		for off < dataStart { // a hole
			n := min(uint64(chunk), dataStart-off, uint64(len(zeroChunk)))
			if err := fn(off, zeroChunk[:n], true); err != nil {
				return err
			}
			off += n
		}
		if off >= size {
			break
		}
		hole, err := unix.Seek(fd, int64(off), unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		for end := min(uint64(hole), size); off < end; {
			n := min(uint64(chunk), end-off)
			b := buf[:n]
			if _, err := f.ReadAt(b, int64(off)); err != nil && !errors.Is(err, io.EOF) {
				return err
			}
			if err := fn(off, b, IsZero(b)); err != nil {
				return err
			}
			off += n
		}
	}
	return nil
}

// dataBytes estimates the bytes in data regions (what Publish may send).
func dataBytes(f *os.File, size uint64) uint64 {
	fd := int(f.Fd())
	var n uint64
	for off := int64(0); uint64(off) < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			break
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			break
		}
		n += uint64(h - d)
		off = h
	}
	return n
}

// BlockResult is one block answered by a BlockStream.
type BlockResult struct {
	Block  uint64
	Zero   bool
	Data   []byte // uncompressed; nil when Zero
	Length uint32
	Digest []byte
}

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
	results []BlockResult
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
		r := BlockResult{Block: resp.Block, Zero: resp.Zero, Length: resp.Length, Digest: resp.Digest}
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
func (s *BlockStream) Read(ctx context.Context, image, file string, block uint64, count uint32) ([]BlockResult, error) {
	count = max(count, 1)
	p := &pendingRead{first: block, results: make([]BlockResult, count), left: int(count), ch: make(chan struct{})}
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

// VerifyBlock checks a block's data against an expected digest.
func VerifyBlock(r BlockResult, want []byte) error {
	var got [DigestSize]byte
	if r.Zero {
		got = ZeroDigest(int(r.Length))
	} else {
		got = sha256.Sum256(r.Data)
	}
	if !bytes.Equal(got[:], want) {
		return fmt.Errorf("block %d: digest mismatch: %w", r.Block, errdefs.ErrDataLoss)
	}
	return nil
}

// ChunkFunc receives a FetchFile chunk: data holds length uncompressed bytes,
// or is nil when the chunk is all zero.
type ChunkFunc func(off uint64, length uint32, data []byte) error

// FetchFile streams a whole file through the compressed channel, calling fn
// for every chunk in order from offset on, and resumes after a broken stream
// from the last chunk delivered (up to retries times).
func (c *Client) FetchFile(ctx context.Context, image, file string, offset uint64, retries int, fn ChunkFunc) error {
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
	if err != nil {
		return err
	}
	defer dec.Close()
	var buf []byte
	for attempt := 0; ; attempt++ {
		stream, err := c.API.FetchFile(ctx, &imagev1.FetchFileRequest{Image: image, File: file, Offset: offset})
		if err == nil {
			for {
				var resp *imagev1.FetchFileResponse
				resp, err = stream.Recv()
				if errors.Is(err, io.EOF) {
					return nil
				}
				if err != nil {
					break
				}
				var data []byte
				if !resp.Zero {
					buf, err = dec.DecodeAll(resp.Data, buf[:0])
					if err != nil {
						return fmt.Errorf("chunk at %d: corrupt compressed data: %w", resp.Offset, errdefs.ErrDataLoss)
					}
					if len(buf) != int(resp.Length) {
						return fmt.Errorf("chunk at %d: %d bytes, expected %d: %w", resp.Offset, len(buf), resp.Length, errdefs.ErrDataLoss)
					}
					data = buf
				}
				if err := fn(resp.Offset, resp.Length, data); err != nil {
					return err
				}
				offset = resp.Offset + uint64(resp.Length)
			}
		}
		if attempt >= retries || !errdefs.IsUnavailable(err) || ctx.Err() != nil {
			return err
		}
	}
}
