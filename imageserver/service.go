package imageserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"

	"github.com/klauspost/compress/zstd"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/auth"
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
	// EncodeAll runs on one of the encoder's states at a time: with one, the
	// parallel FetchFile workers and ReadBlocks readers would take turns.
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)))
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
func (s *Service) ListImages(ctx context.Context, req *imagev1.ListImagesRequest) (*imagev1.ListImagesResponse, error) {
	return &imagev1.ListImagesResponse{Images: auth.VisibleImages(ctx, s.store.List(req))}, nil
}

// GetImage implements ImageService.GetImage.
func (s *Service) GetImage(ctx context.Context, req *imagev1.GetImageRequest) (*imagev1.GetImageResponse, error) {
	m, err := s.store.Get(req.Name, req.View)
	if err != nil {
		return nil, err
	}
	if err := auth.CheckImage(ctx, m); err != nil {
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
func (s *Service) GetProfile(ctx context.Context, req *imagev1.GetProfileRequest) (*imagev1.GetProfileResponse, error) {
	if err := s.visible(ctx, req.Image); err != nil {
		return nil, err
	}
	e, err := s.store.GetProfile(req.Image)
	if err != nil {
		return nil, err
	}
	return &imagev1.GetProfileResponse{Entries: e}, nil
}

// ReadBlocks implements ImageService.ReadBlocks.
func (s *Service) ReadBlocks(stream imagev1.ImageService_ReadBlocksServer) error {
	return blockproto.ServeReadBlocks(stream, storeSources{s.store}, s.enc, s.m)
}

// Block counts one ReadBlocks answer.
func (m *metrics) Block(result string, payload int) {
	m.blocks.WithLabelValues(result).Inc()
	if payload > 0 {
		m.bytesSent.WithLabelValues("ReadBlocks").Add(float64(payload))
	}
}

// storeSources opens store files for the shared serving loops.
type storeSources struct{ s *Store }

type storeSource struct{ h *FileHandle }

func (o storeSources) OpenSource(ctx context.Context, image, file string) (blockproto.BlockSource, error) {
	if err := (&Service{store: o.s}).visible(ctx, image); err != nil {
		return nil, err
	}
	h, err := o.s.OpenFile(image, file)
	if err != nil {
		return nil, err
	}
	return storeSource{h}, nil
}

func (o storeSources) Valid(src blockproto.BlockSource) bool { return o.s.current(src.(storeSource).h) }

func (s storeSource) Meta() *imagev1.FileMeta { return s.h.Meta() }
func (s storeSource) ReadBlock(_ context.Context, index uint64, buf []byte) (blockproto.Block, error) {
	return s.h.ReadBlock(index, buf)
}
func (s storeSource) ReadRange(_ context.Context, off uint64, buf []byte) (bool, error) {
	return s.h.ReadRange(off, buf)
}
func (s storeSource) Frame(_ context.Context, off uint64) ([]byte, bool, bool, error) {
	return s.h.Frame(off)
}

// FetchFile implements ImageService.FetchFile.
func (s *Service) FetchFile(req *imagev1.FetchFileRequest, stream imagev1.ImageService_FetchFileServer) error {
	if err := s.visible(stream.Context(), req.Image); err != nil {
		return err
	}
	h, err := s.store.OpenFile(req.Image, req.File)
	if err != nil {
		return err
	}
	return blockproto.ServeFetchFile(req, stream, storeSource{h}, s.enc, func(n int) {
		s.m.bytesSent.WithLabelValues("FetchFile").Add(float64(n))
	})
}

// visible refuses an image the caller may not see (auth.CheckImage); a
// missing image is left to the call's own lookup.
func (s *Service) visible(ctx context.Context, image string) error {
	m, err := s.store.Get(image, imagev1.View_VIEW_BASIC)
	if err != nil {
		return nil
	}
	return auth.CheckImage(ctx, m)
}
