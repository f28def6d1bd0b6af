package cacheproxy

import (
	"context"
	"errors"
	"io"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/auth"
)

// Service is the ImageService of a cache proxy over a gvfs.Proxy.
// second-level LAN cache, §3.2.1). Reads are answered from its caches and
// misses go to its upstream; everything else is forwarded. Because it speaks
// the same API as the image server, compute servers and other proxies use it
// as their upstream, so proxies chain.
type Service struct {
	imagev1.UnimplementedImageServiceServer
	p   *gvfs.Proxy
	enc *zstd.Encoder
}

var _ imagev1.ImageServiceServer = (*Service)(nil)

// NewService returns the ImageService of a cache proxy.
func NewService(p *gvfs.Proxy) (*Service, error) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	return &Service{p: p, enc: enc}, nil
}

// Register adds the service to a gRPC server.
func (s *Service) Register(gs *grpc.Server) { imagev1.RegisterImageServiceServer(gs, s) }

func (s *Service) api() imagev1.ImageServiceClient { return s.p.Upstream().Client.API }

// GetImage answers from the proxy's manifest cache (golden manifests are
// rechecked upstream every Config.GoldenRecheck).
func (s *Service) GetImage(ctx context.Context, req *imagev1.GetImageRequest) (*imagev1.GetImageResponse, error) {
	m, err := s.p.Image(ctx, req.Name)
	if err != nil {
		return nil, err
	}
	if err := auth.CheckImage(ctx, m); err != nil {
		return nil, err
	}
	m = proto.Clone(m).(*imagev1.Manifest)
	if req.View != imagev1.View_VIEW_FULL {
		for _, f := range m.Files {
			f.ZeroMap, f.BlockDigests = nil, nil
		}
	}
	return &imagev1.GetImageResponse{Manifest: m}, nil
}

func (s *Service) ListImages(ctx context.Context, req *imagev1.ListImagesRequest) (*imagev1.ListImagesResponse, error) {
	resp, err := s.api().ListImages(ctx, req)
	if err != nil {
		return nil, err
	}
	resp.Images = auth.VisibleImages(ctx, resp.Images)
	return resp, nil
}

func (s *Service) DeleteImage(ctx context.Context, req *imagev1.DeleteImageRequest) (*imagev1.DeleteImageResponse, error) {
	resp, err := s.api().DeleteImage(ctx, req)
	if err == nil {
		s.p.Forget(req.Name)
	}
	return resp, err
}

func (s *Service) CreateDisk(ctx context.Context, req *imagev1.CreateDiskRequest) (*imagev1.CreateDiskResponse, error) {
	return s.api().CreateDisk(ctx, req)
}

func (s *Service) PutProfile(ctx context.Context, req *imagev1.PutProfileRequest) (*imagev1.PutProfileResponse, error) {
	return s.api().PutProfile(ctx, req)
}

func (s *Service) GetProfile(ctx context.Context, req *imagev1.GetProfileRequest) (*imagev1.GetProfileResponse, error) {
	if err := (proxySources{p: s.p}).visible(ctx, req.Image); err != nil {
		return nil, err
	}
	return s.api().GetProfile(ctx, req)
}

// Publish is forwarded to the upstream.
func (s *Service) Publish(stream imagev1.ImageService_PublishServer) error {
	up, err := s.api().Publish(stream.Context())
	if err != nil {
		return err
	}
	return forward(stream, up)
}

// WriteBlocks is forwarded to the upstream; the proxy then drops what it
// cached of the disk.
func (s *Service) WriteBlocks(stream imagev1.ImageService_WriteBlocksServer) error {
	up, err := s.api().WriteBlocks(stream.Context())
	if err != nil {
		return err
	}
	var disk string
	err = forwardWith(stream, up, func(r *imagev1.WriteBlocksRequest) {
		if r.Disk != "" {
			disk = r.Disk
		}
	})
	if disk != "" {
		s.p.Forget(disk)
	}
	return err
}

// forward relays a client stream to the upstream and its answer back. A
// client that goes away cancels the upstream call, so an upload that never
// committed leaves nothing there either.
func forward[Req, Resp any](in grpc.ClientStreamingServer[Req, Resp], out grpc.ClientStreamingClient[Req, Resp]) error {
	return forwardWith(in, out, nil)
}

func forwardWith[Req, Resp any](in grpc.ClientStreamingServer[Req, Resp], out grpc.ClientStreamingClient[Req, Resp], see func(*Req)) error {
	for {
		req, err := in.Recv()
		if errors.Is(err, io.EOF) {
			resp, err := out.CloseAndRecv()
			if err != nil {
				return err
			}
			return in.SendAndClose(resp)
		}
		if err != nil {
			return err
		}
		if see != nil {
			see(req)
		}
		if err := out.Send(req); err != nil {
			if _, rerr := out.CloseAndRecv(); rerr != nil {
				return rerr
			}
			return err
		}
	}
}

// ReadBlocks serves blocks from the proxy's caches. Each request's misses
// go upstream at once, as runs, in the class the stream names
// (gvfs.ClassHeader).
func (s *Service) ReadBlocks(stream imagev1.ImageService_ReadBlocksServer) error {
	var name string
	if md, ok := metadata.FromIncomingContext(stream.Context()); ok {
		if v := md.Get(gvfs.ClassHeader); len(v) > 0 {
			name = v[0]
		}
	}
	c, err := gvfs.ParseClass(name)
	if err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	return blockproto.ServeReadBlocks(stream, proxySources{p: s.p, class: c}, s.enc, nil)
}

// FetchFile streams a whole file from the proxy's file cache (fetching it
// upstream once) or, for block-policy files, from its block cache.
func (s *Service) FetchFile(req *imagev1.FetchFileRequest, stream imagev1.ImageService_FetchFileServer) error {
	src, err := proxySources{p: s.p}.OpenSource(stream.Context(), req.Image, req.File)
	if err != nil {
		return err
	}
	return blockproto.ServeFetchFile(req, stream, src, s.enc, nil)
}

// proxySources opens the proxy's files for a stream of class class.
type proxySources struct {
	p     *gvfs.Proxy
	class gvfs.Class
}

func (o proxySources) OpenSource(ctx context.Context, image, file string) (blockproto.BlockSource, error) {
	if err := o.visible(ctx, image); err != nil {
		return nil, err
	}
	f, err := o.p.Open(ctx, image, file)
	if err != nil {
		return nil, err
	}
	return classFile{f, o.class}, nil
}

// classFile is a proxy's file served to a stream of one class: the runs it
// is asked for go upstream in that class (blockproto.RunStarter).
type classFile struct {
	gvfs.File
	class gvfs.Class
}

func (f classFile) StartRun(first uint64, count uint32) { f.File.StartRun(f.class, first, count) }

// visible refuses an image the caller may not see (auth.CheckImage), as
// the image server does.
func (o proxySources) visible(ctx context.Context, image string) error {
	m, err := o.p.Image(ctx, image)
	if err != nil {
		return err
	}
	return auth.CheckImage(ctx, m)
}

// Valid keeps golden files open for the life of a stream (they never
// change), but has every request for a disk open it again, so that the
// disk's generation is checked and blocks another plant wrote are not served
// from a stale cache.
func (proxySources) Valid(src blockproto.BlockSource) bool { return !src.(classFile).Writable() }
