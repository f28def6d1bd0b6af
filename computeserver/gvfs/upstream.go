package gvfs

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sync/semaphore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
)

// Upstream is the next tier toward the image server: the image server
// itself or a cache proxy, anything that speaks ImageService. Block reads
// go by class (Class): a running guest's demand reads have a connection of
// their own, so they never queue behind the bytes of bulk transfers
// (whole-file streams, profile prefetch, hydration), which share a second
// connection whose flow-control windows are small (bulkWindow): the server
// cannot push more than that ahead of anything. Each class has its own
// pipelined ReadBlocks stream, reopened when it breaks, and the bulk
// classes a bound on the bytes they have in flight.
type Upstream struct {
	Addr   string
	Client *imageclient.Client
	// Bulk is the client on the bulk connection: whole-file streams use it.
	Bulk     *imageclient.Client
	cc, bcc  *grpc.ClientConn
	compress bool

	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	bs     [numClasses]*imageclient.BlockStream
	limit  [numClasses]*semaphore.Weighted // nil: no bound
	out    outage
}

// Class is the priority class of a block read.
type Class int

const (
	// Demand: a reader (a guest's page or block fault) waits for it.
	Demand Class = iota
	// Prefetch: a working-set profile's blocks, wanted soon.
	Prefetch
	// Background: hydration and other bulk copies, wanted some time.
	Background
	numClasses
)

func (c Class) String() string {
	return [...]string{"demand", "prefetch", "background"}[c]
}

// ClassHeader is the gRPC metadata key a ReadBlocks stream names its class
// with, so that a cache proxy asks its own upstream in the same class: a
// plant's hydration through a proxy stays behind other plants' faults
// across the WAN too. A stream without it is demand.
const ClassHeader = "vmgrid-read-class"

// ParseClass reads a ClassHeader value ("" is demand).
func ParseClass(s string) (Class, error) {
	if s == "" {
		return Demand, nil
	}
	for c := range numClasses {
		if c.String() == s {
			return c, nil
		}
	}
	return Demand, fmt.Errorf("%s %q: want demand, prefetch or background", ClassHeader, s)
}

const (
	// bulkWindow is the HTTP/2 stream window of the bulk connection: what
	// a server may send ahead on one stream before the plant has taken it
	// (1 MiB: 84 ms at 100 Mbit/s, and 1 MiB per 40 ms round trip is more
	// than such a link carries, so bulk still fills the link).
	bulkWindow = 1 << 20
)

// inFlight bounds the bytes each class has requested and not yet received.
var inFlight = [numClasses]int{Demand: 0, Prefetch: 4 << 20, Background: 1 << 20}

// DialUpstream connects to addr. With compress set, blocks may come
// zstd-compressed (worth it on slow links, a loss on loopback). extra
// adds dial options (the caller's identity: services.WithToken).
func DialUpstream(addr string, tls services.TLSFiles, compress bool, extra ...grpc.DialOption) (*Upstream, error) {
	cc, err := services.Dial(addr, tls, extra...)
	if err != nil {
		return nil, err
	}
	bulk := append(append([]grpc.DialOption(nil), extra...),
		grpc.WithInitialWindowSize(bulkWindow), grpc.WithInitialConnWindowSize(2*bulkWindow))
	bcc, err := services.Dial(addr, tls, bulk...)
	if err != nil {
		cc.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	u := &Upstream{Addr: addr, Client: imageclient.NewClient(cc), Bulk: imageclient.NewClient(bcc), cc: cc, bcc: bcc,
		compress: compress, ctx: ctx, cancel: cancel}
	for c, n := range inFlight {
		if n > 0 {
			u.limit[c] = semaphore.NewWeighted(int64(n))
		}
	}
	return u, nil
}

func (u *Upstream) stream(c Class) (*imageclient.BlockStream, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if bs := u.bs[c]; bs != nil && bs.Err() == nil {
		return bs, nil
	}
	if u.bs[c] != nil {
		u.bs[c].Close()
		u.bs[c] = nil
	}
	client := u.Client
	if c != Demand {
		client = u.Bulk
	}
	bs, err := client.OpenBlockStream(metadata.AppendToOutgoingContext(u.ctx, ClassHeader, c.String()), u.compress)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", u.Addr, err)
	}
	u.bs[c] = bs
	return bs, nil
}

// ReadBlocks reads count blocks from block on as a demand read.
func (u *Upstream) ReadBlocks(ctx context.Context, image, file string, block uint64, count uint32) ([]blockproto.BlockResult, error) {
	return u.ReadBlocksClass(ctx, Demand, image, file, block, count, 0)
}

// ReadBlocksClass reads count blocks from block on in class c (bytes is
// what they hold at most, for the class's in-flight bound), retrying once
// on a fresh stream when the class's stream broke (the proxy waits out an
// upstream that is away for longer: Config.UpstreamRetry).
func (u *Upstream) ReadBlocksClass(ctx context.Context, c Class, image, file string, block uint64, count uint32, bytes int) ([]blockproto.BlockResult, error) {
	release, err := u.acquire(ctx, c, bytes)
	if err != nil {
		return nil, err
	}
	defer release()
	for attempt := 0; ; attempt++ {
		bs, err := u.stream(c)
		if err != nil {
			return nil, err
		}
		res, err := bs.Read(ctx, image, file, block, count)
		if err == nil || attempt > 0 || bs.Err() == nil {
			return res, err
		}
	}
}

// acquire takes class c's in-flight bound for bytes (at most all of it).
func (u *Upstream) acquire(ctx context.Context, c Class, bytes int) (func(), error) {
	sem := u.limit[c]
	if sem == nil {
		return func() {}, nil
	}
	n := min(max(int64(bytes), 1), int64(inFlight[c]))
	if err := sem.Acquire(ctx, n); err != nil {
		return nil, err
	}
	return func() { sem.Release(n) }, nil
}

// Manifest returns the FULL manifest of an image or disk. With compress
// set it comes gzipped: a digest per block, zero blocks included, is most
// of it (a 1 GiB RAM file's are 512 KiB, 42 ms at 100 Mbit/s, before the
// guest can run), and the zero blocks' digests are all the same.
func (u *Upstream) Manifest(ctx context.Context, name string) (*imagev1.Manifest, error) {
	var opts []grpc.CallOption
	if u.compress {
		opts = append(opts, grpc.UseCompressor(gzip.Name))
	}
	req := &imagev1.GetImageRequest{Name: name, View: imagev1.View_VIEW_FULL}
	resp, err := u.Client.API.GetImage(ctx, req, opts...)
	if len(opts) > 0 && status.Code(err) == codes.Unimplemented {
		resp, err = u.Client.API.GetImage(ctx, req) // an upstream without gzip
	}
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
	for _, bs := range u.bs {
		if bs != nil {
			bs.Close()
		}
	}
	u.mu.Unlock()
	u.cancel()
	return errors.Join(u.cc.Close(), u.bcc.Close())
}
