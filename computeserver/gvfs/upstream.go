package gvfs

import (
	"context"
	"fmt"
	"sync"

	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
)

// Upstream is the next tier toward the image server: the image server
// itself or a cache proxy, anything that speaks ImageService. All block
// reads share one pipelined ReadBlocks stream, reopened when it breaks.
type Upstream struct {
	Addr     string
	Client   *imageclient.Client
	cc       *grpc.ClientConn
	compress bool

	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	bs     *imageclient.BlockStream
	out    outage
}

// DialUpstream connects to addr. With compress set, blocks may come
// zstd-compressed (worth it on slow links, a loss on loopback). extra
// adds dial options (the caller's identity: services.WithToken).
func DialUpstream(addr string, tls services.TLSFiles, compress bool, extra ...grpc.DialOption) (*Upstream, error) {
	cc, err := services.Dial(addr, tls, extra...)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Upstream{Addr: addr, Client: imageclient.NewClient(cc), cc: cc, compress: compress, ctx: ctx, cancel: cancel}, nil
}

func (u *Upstream) stream() (*imageclient.BlockStream, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.bs != nil && u.bs.Err() == nil {
		return u.bs, nil
	}
	if u.bs != nil {
		u.bs.Close()
		u.bs = nil
	}
	bs, err := u.Client.OpenBlockStream(u.ctx, u.compress)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", u.Addr, err)
	}
	u.bs = bs
	return bs, nil
}

// ReadBlocks reads count blocks from block on, retrying once on a fresh
// stream when the shared stream broke (the proxy waits out an upstream
// that is away for longer: Config.UpstreamRetry).
func (u *Upstream) ReadBlocks(ctx context.Context, image, file string, block uint64, count uint32) ([]blockproto.BlockResult, error) {
	for attempt := 0; ; attempt++ {
		bs, err := u.stream()
		if err != nil {
			return nil, err
		}
		res, err := bs.Read(ctx, image, file, block, count)
		if err == nil || attempt > 0 || bs.Err() == nil {
			return res, err
		}
	}
}

// Manifest returns the FULL manifest of an image or disk.
func (u *Upstream) Manifest(ctx context.Context, name string) (*imagev1.Manifest, error) {
	resp, err := u.Client.API.GetImage(ctx, &imagev1.GetImageRequest{Name: name, View: imagev1.View_VIEW_FULL})
	if err != nil {
		return nil, err
	}
	return resp.Manifest, nil
}

// Summary returns an image's manifest without zero maps or block digests.
func (u *Upstream) Summary(ctx context.Context, name string) (*imagev1.Manifest, error) {
	resp, err := u.Client.API.GetImage(ctx, &imagev1.GetImageRequest{Name: name, View: imagev1.View_VIEW_BASIC})
	if err != nil {
		return nil, err
	}
	return resp.Manifest, nil
}

// List returns the catalog.
func (u *Upstream) List(ctx context.Context) ([]*imagev1.Manifest, error) {
	resp, err := u.Client.API.ListImages(ctx, &imagev1.ListImagesRequest{})
	if err != nil {
		return nil, err
	}
	return resp.Images, nil
}

// Close ends the stream and the connection.
func (u *Upstream) Close() error {
	u.mu.Lock()
	if u.bs != nil {
		u.bs.Close()
	}
	u.mu.Unlock()
	u.cancel()
	return u.cc.Close()
}
