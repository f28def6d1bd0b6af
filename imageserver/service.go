package imageserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Service is the gRPC adapter of the image warehouse over a Store.
type Service struct {
	imagev1.UnimplementedImageServiceServer
	store *Store
	log   *zap.Logger
	enc   *zstd.Encoder
	m     *metrics
}

var _ imagev1.ImageServiceServer = (*Service)(nil)

type metrics struct {
	blocks    *prometheus.CounterVec
	bytesSent *prometheus.CounterVec
	published prometheus.Counter
	writes    prometheus.Counter
}

// NewService returns the ImageService over store and registers its metrics.
func NewService(store *Store, log *zap.Logger, reg prometheus.Registerer) (*Service, error) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	m := &metrics{
		blocks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "imageserver", Name: "blocks_served_total",
			Help: "Blocks answered by ReadBlocks, by result (data, zero, error).",
		}, []string{"result"}),
		bytesSent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "imageserver", Name: "bytes_sent_total",
			Help: "Payload bytes sent, by RPC (ReadBlocks, FetchFile).",
		}, []string{"rpc"}),
		published: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "imageserver", Name: "images_published_total",
			Help: "Images published.",
		}),
		writes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "imageserver", Name: "blocks_written_total",
			Help: "Blocks committed into persistent disks by WriteBlocks.",
		}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.blocks, m.bytesSent, m.published, m.writes} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return &Service{store: store, log: log, enc: enc, m: m}, nil
}

// Register adds the service to a gRPC server.
func (s *Service) Register(gs *grpc.Server) { imagev1.RegisterImageServiceServer(gs, s) }

// Publish implements ImageService.Publish.
func (s *Service) Publish(stream imagev1.ImageService_PublishServer) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	h := first.GetHeader()
	if h == nil {
		return fmt.Errorf("the first publish message must be the header: %w", errdefs.ErrInvalidArgument)
	}
	up, err := s.store.BeginPublish(h)
	if err != nil {
		return err
	}
	defer up.Abort() // no-op after a successful commit
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("the upload of %q ended without a commit after %d bytes; nothing was published: %w", h.Name, up.Received(), errdefs.ErrInvalidArgument)
		}
		if err != nil {
			return err
		}
		switch m := req.Msg.(type) {
		case *imagev1.PublishRequest_Header:
			return fmt.Errorf("a second header in one upload: %w", errdefs.ErrInvalidArgument)
		case *imagev1.PublishRequest_Data:
			if err := up.Write(m.Data.FileIndex, m.Data.Offset, m.Data.Data); err != nil {
				return err
			}
		case *imagev1.PublishRequest_Commit:
			man, err := up.Commit(m.Commit.FileSha256)
			if err != nil {
				return err
			}
			s.m.published.Inc()
			return stream.SendAndClose(&imagev1.PublishResponse{Manifest: view(man, imagev1.View_VIEW_BASIC), BytesReceived: up.Received()})
		}
	}
}

// ListImages implements ImageService.ListImages.
func (s *Service) ListImages(_ context.Context, req *imagev1.ListImagesRequest) (*imagev1.ListImagesResponse, error) {
	return &imagev1.ListImagesResponse{Images: s.store.List(req)}, nil
}

// GetImage implements ImageService.GetImage.
func (s *Service) GetImage(_ context.Context, req *imagev1.GetImageRequest) (*imagev1.GetImageResponse, error) {
	m, err := s.store.Get(req.Name, req.View)
	if err != nil {
		return nil, err
	}
	return &imagev1.GetImageResponse{Manifest: m}, nil
}

// DeleteImage implements ImageService.DeleteImage.
func (s *Service) DeleteImage(_ context.Context, req *imagev1.DeleteImageRequest) (*imagev1.DeleteImageResponse, error) {
	return &imagev1.DeleteImageResponse{}, s.store.Delete(req.Name)
}

// CreateDisk implements ImageService.CreateDisk.
func (s *Service) CreateDisk(_ context.Context, req *imagev1.CreateDiskRequest) (*imagev1.CreateDiskResponse, error) {
	m, err := s.store.CreateDisk(req.Name, req.SourceImage, req.SourceFile, req.Labels)
	if err != nil {
		return nil, err
	}
	return &imagev1.CreateDiskResponse{Manifest: m}, nil
}

// WriteBlocks implements ImageService.WriteBlocks.
func (s *Service) WriteBlocks(stream imagev1.ImageService_WriteBlocksServer) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	if first.Disk == "" {
		return fmt.Errorf("the first WriteBlocks message must name the disk: %w", errdefs.ErrInvalidArgument)
	}
	b, err := s.store.BeginWrite(first.Disk, first.ExpectGeneration)
	if err != nil {
		return err
	}
	defer b.Abort()
	for req := first; ; {
		if req.Disk != "" && req.Disk != first.Disk {
			return fmt.Errorf("one batch writes one disk (%q), not %q: %w", first.Disk, req.Disk, errdefs.ErrInvalidArgument)
		}
		for _, w := range req.Writes {
			if err := b.Add(w.Block, w.Data); err != nil {
				return err
			}
		}
		if req.Commit {
			gen, n, err := b.Commit()
			if err != nil {
				return err
			}
			s.m.writes.Add(float64(n))
			return stream.SendAndClose(&imagev1.WriteBlocksResponse{Generation: gen, BlocksWritten: n})
		}
		req, err = stream.Recv()
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("the write batch for %q ended without a commit; nothing was written: %w", first.Disk, errdefs.ErrInvalidArgument)
		}
		if err != nil {
			return err
		}
	}
}

// PutProfile implements ImageService.PutProfile.
func (s *Service) PutProfile(_ context.Context, req *imagev1.PutProfileRequest) (*imagev1.PutProfileResponse, error) {
	return &imagev1.PutProfileResponse{}, s.store.PutProfile(req.Image, req.Entries)
}

// GetProfile implements ImageService.GetProfile.
func (s *Service) GetProfile(_ context.Context, req *imagev1.GetProfileRequest) (*imagev1.GetProfileResponse, error) {
	e, err := s.store.GetProfile(req.Image)
	if err != nil {
		return nil, err
	}
	return &imagev1.GetProfileResponse{Entries: e}, nil
}

// readWorkers read blocks in parallel for one ReadBlocks stream, so a
// pipelined client keeps the disk and the wire busy at once.
var readWorkers = max(4, runtime.NumCPU())

type blockJob struct {
	tag    uint64
	h      *FileHandle
	block  uint64
	accept imagev1.Compression
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, MaxBlockSize); return &b }}

// ReadBlocks implements ImageService.ReadBlocks.
func (s *Service) ReadBlocks(stream imagev1.ImageService_ReadBlocksServer) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	jobs := make(chan blockJob, 256)
	// buf, when set, backs resp.Data and goes back to the pool after Send.
	type outMsg struct {
		resp *imagev1.ReadBlocksResponse
		buf  *[]byte
	}
	out := make(chan outMsg, 256)

	// Receiver: resolves files once per stream and fans requests out.
	recvErr := make(chan error, 1)
	go func() {
		defer close(jobs)
		handles := map[[2]string]*FileHandle{}
		for {
			req, err := stream.Recv()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					recvErr <- err
				}
				return
			}
			key := [2]string{req.Image, req.File}
			h := handles[key]
			if h == nil {
				if h, err = s.store.OpenFile(req.Image, req.File); err != nil {
					select {
					case out <- outMsg{resp: errorResponse(req.Tag, req.Block, err)}:
					case <-ctx.Done():
						return
					}
					continue
				}
				handles[key] = h
			}
			count := max(req.Count, 1)
			for i := uint64(0); i < uint64(count); i++ {
				select {
				case jobs <- blockJob{tag: req.Tag, h: h, block: req.Block + i, accept: req.Accept}:
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
				b, err := j.h.ReadBlock(j.block, *bp)
				var resp *imagev1.ReadBlocksResponse
				switch {
				case err != nil:
					resp = errorResponse(j.tag, j.block, err)
					bufPool.Put(bp)
					bp = nil
				case b.Zero:
					resp = &imagev1.ReadBlocksResponse{Tag: j.tag, Block: j.block, Zero: true, Length: b.Length, Digest: b.Digest}
					bufPool.Put(bp)
					bp = nil
				default:
					resp = &imagev1.ReadBlocksResponse{Tag: j.tag, Block: j.block, Data: b.Data, Length: b.Length, Digest: b.Digest}
					if j.accept == imagev1.Compression_COMPRESSION_ZSTD {
						if c := s.enc.EncodeAll(b.Data, nil); len(c) < len(b.Data)*7/8 {
							resp.Data, resp.Compression = c, imagev1.Compression_COMPRESSION_ZSTD
							bufPool.Put(bp)
							bp = nil
						}
					}
				}
				select {
				case out <- outMsg{resp, bp}:
				case <-ctx.Done():
				}
			}
		}()
	}
	go func() { wg.Wait(); close(out) }()

	// Sender: the only goroutine that calls stream.Send.
	var sendErr error
	for msg := range out {
		resp := msg.resp
		if sendErr == nil {
			sendErr = stream.Send(resp)
			if sendErr != nil {
				cancel()
			}
			switch {
			case resp.Error != nil:
				s.m.blocks.WithLabelValues("error").Inc()
			case resp.Zero:
				s.m.blocks.WithLabelValues("zero").Inc()
			default:
				s.m.blocks.WithLabelValues("data").Inc()
				s.m.bytesSent.WithLabelValues("ReadBlocks").Add(float64(len(resp.Data)))
			}
		}
		// Send has serialized the message: the buffer can be reused.
		if msg.buf != nil {
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

func errorResponse(tag, block uint64, err error) *imagev1.ReadBlocksResponse {
	return &imagev1.ReadBlocksResponse{Tag: tag, Block: block, Error: &imagev1.Error{Code: uint32(errdefs.Code(err)), Message: err.Error()}}
}

// FetchFile implements ImageService.FetchFile: chunks are read and
// compressed by several workers and sent in order.
func (s *Service) FetchFile(req *imagev1.FetchFileRequest, stream imagev1.ImageService_FetchFileServer) error {
	h, err := s.store.OpenFile(req.Image, req.File)
	if err != nil {
		return err
	}
	meta := h.Meta()
	cs := uint64(meta.ChunkSize)
	if req.Offset%cs != 0 {
		return fmt.Errorf("offset %d is not a multiple of the chunk size %d; resume from the start of the last chunk received: %w", req.Offset, cs, errdefs.ErrInvalidArgument)
	}
	if req.Offset > meta.Size {
		return fmt.Errorf("offset %d is past the end of %q (%d bytes): %w", req.Offset, meta.Name, meta.Size, errdefs.ErrOutOfRange)
	}
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	type result struct {
		resp *imagev1.FetchFileResponse
		err  error
	}
	// A window of futures keeps chunks in order while workers run ahead.
	workers := max(2, runtime.NumCPU())
	futures := make(chan chan result, workers*2)
	sem := make(chan struct{}, workers)
	go func() {
		defer close(futures)
		for off := req.Offset; off < meta.Size; off += cs {
			f := make(chan result, 1)
			select {
			case futures <- f:
			case <-ctx.Done():
				return
			}
			sem <- struct{}{}
			go func(off uint64) {
				defer func() { <-sem }()
				n := min(cs, meta.Size-off)
				bp := bufPool.Get().(*[]byte)
				defer bufPool.Put(bp)
				buf := (*bp)[:n]
				zero, err := h.ReadRange(off, buf)
				if err != nil {
					f <- result{err: err}
					return
				}
				r := &imagev1.FetchFileResponse{Offset: off, Length: uint32(n), Zero: zero}
				if !zero {
					r.Data = s.enc.EncodeAll(buf, make([]byte, 0, n/2))
				}
				f <- result{resp: r}
			}(off)
		}
	}()
	for f := range futures {
		r := <-f
		if r.err != nil {
			return r.err
		}
		if err := stream.Send(r.resp); err != nil {
			return err
		}
		s.m.bytesSent.WithLabelValues("FetchFile").Add(float64(len(r.resp.Data)))
	}
	return ctx.Err()
}
