package gvfs

import (
	"context"
	"crypto/sha256"
	"errors"
	"io"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// ProxyService serves ImageService from a Proxy: a cache proxy (GVFS's
// second-level LAN cache, §3.2.1). Reads are answered from its caches and
// misses go to its upstream; everything else is forwarded. Because it speaks
// the same API as the image server, compute servers and other proxies use it
// as their upstream, so proxies chain.
type ProxyService struct {
	imagev1.UnimplementedImageServiceServer
	p   *Proxy
	enc *zstd.Encoder
}

var _ imagev1.ImageServiceServer = (*ProxyService)(nil)

// NewProxyService returns the ImageService of a cache proxy.
func NewProxyService(p *Proxy) (*ProxyService, error) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	return &ProxyService{p: p, enc: enc}, nil
}

// Register adds the service to a gRPC server.
func (s *ProxyService) Register(gs *grpc.Server) { imagev1.RegisterImageServiceServer(gs, s) }

func (s *ProxyService) api() imagev1.ImageServiceClient { return s.p.up.Client.API }

// GetImage answers from the proxy's manifest cache (golden manifests are
// rechecked upstream every Config.GoldenRecheck).
func (s *ProxyService) GetImage(ctx context.Context, req *imagev1.GetImageRequest) (*imagev1.GetImageResponse, error) {
	m, err := s.p.Image(ctx, req.Name)
	if err != nil {
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

func (s *ProxyService) ListImages(ctx context.Context, req *imagev1.ListImagesRequest) (*imagev1.ListImagesResponse, error) {
	return s.api().ListImages(ctx, req)
}

func (s *ProxyService) DeleteImage(ctx context.Context, req *imagev1.DeleteImageRequest) (*imagev1.DeleteImageResponse, error) {
	resp, err := s.api().DeleteImage(ctx, req)
	if err == nil {
		s.p.forget(req.Name)
	}
	return resp, err
}

func (s *ProxyService) CreateDisk(ctx context.Context, req *imagev1.CreateDiskRequest) (*imagev1.CreateDiskResponse, error) {
	return s.api().CreateDisk(ctx, req)
}

func (s *ProxyService) PutProfile(ctx context.Context, req *imagev1.PutProfileRequest) (*imagev1.PutProfileResponse, error) {
	return s.api().PutProfile(ctx, req)
}

func (s *ProxyService) GetProfile(ctx context.Context, req *imagev1.GetProfileRequest) (*imagev1.GetProfileResponse, error) {
	return s.api().GetProfile(ctx, req)
}

// Publish is forwarded to the upstream.
func (s *ProxyService) Publish(stream imagev1.ImageService_PublishServer) error {
	up, err := s.api().Publish(stream.Context())
	if err != nil {
		return err
	}
	return forward(stream, up)
}

// WriteBlocks is forwarded to the upstream; the proxy then drops what it
// cached of the disk.
func (s *ProxyService) WriteBlocks(stream imagev1.ImageService_WriteBlocksServer) error {
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
		s.p.forget(disk)
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

// ReadBlocks serves blocks from the proxy's caches.
func (s *ProxyService) ReadBlocks(stream imagev1.ImageService_ReadBlocksServer) error {
	return blockproto.ServeReadBlocks(stream, proxySources{s.p}, s.enc, nil)
}

// FetchFile streams a whole file from the proxy's file cache (fetching it
// upstream once) or, for block-policy files, from its block cache.
func (s *ProxyService) FetchFile(req *imagev1.FetchFileRequest, stream imagev1.ImageService_FetchFileServer) error {
	src, err := proxySources{s.p}.OpenSource(stream.Context(), req.Image, req.File)
	if err != nil {
		return err
	}
	return blockproto.ServeFetchFile(req, stream, src, s.enc, nil)
}

type proxySources struct{ p *Proxy }

func (o proxySources) OpenSource(ctx context.Context, image, file string) (blockproto.BlockSource, error) {
	f, err := o.p.Open(ctx, image, file)
	if err != nil {
		return nil, err
	}
	return proxySource{f}, nil
}

// Valid keeps golden files open for the life of a stream (they never
// change), but has every request for a disk open it again, so that the
// disk's generation is checked and blocks another plant wrote are not served
// from a stale cache.
func (proxySources) Valid(src blockproto.BlockSource) bool { return !src.(proxySource).f.Writable() }

type proxySource struct{ f *File }

func (s proxySource) Meta() *imagev1.FileMeta { return s.f.meta }

func (s proxySource) ReadBlock(ctx context.Context, idx uint64, buf []byte) (blockproto.Block, error) {
	data, zero, err := s.f.ReadBlock(ctx, idx, buf)
	if err != nil {
		return blockproto.Block{}, err
	}
	b := blockproto.Block{Data: data, Zero: zero, Length: uint32(s.f.blockLen(idx)), Digest: s.f.Digest(idx)}
	if b.Digest == nil { // a disk: no manifest digests
		if zero {
			d := blockproto.ZeroDigest(int(b.Length))
			b.Digest = d[:]
		} else {
			d := sha256.Sum256(data)
			b.Digest = d[:]
		}
	}
	return b, nil
}

func (s proxySource) ReadRange(ctx context.Context, off uint64, buf []byte) (bool, error) {
	if s.f.zeroMap != nil && blockproto.IsZeroRange(s.f.zeroMap, off, uint64(len(buf))) {
		return true, nil
	}
	if _, err := s.f.ReadAt(ctx, buf, int64(off)); err != nil {
		return false, err
	}
	return blockproto.IsZero(buf), nil
}

// forget drops what the proxy knows of an image or disk.
func (p *Proxy) forget(name string) {
	p.mu.Lock()
	delete(p.manifests, name)
	for k := range p.open {
		if k[0] == name {
			delete(p.open, k)
		}
	}
	p.mu.Unlock()
	p.cache.Invalidate(diskKey(name))
}
