package computeserver

import (
	"context"
	"fmt"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// cacheService is the gRPC adapter of the data plane's operator API.
type cacheService struct {
	computev1.UnimplementedCacheServiceServer
	p *gvfs.Proxy
}

var _ computev1.CacheServiceServer = (*cacheService)(nil)

func (s *cacheService) Flush(ctx context.Context, req *computev1.FlushRequest) (*computev1.FlushResponse, error) {
	start := time.Now()
	var flushed []gvfs.DiskFlush
	if req.Disk != "" {
		if err := s.checkDisk(ctx, req.Disk); err != nil {
			return nil, err
		}
		r, err := s.p.Flush(ctx, req.Disk)
		if err != nil {
			return nil, err
		}
		flushed = []gvfs.DiskFlush{r}
	} else {
		var err error
		if flushed, err = s.p.FlushAll(ctx); err != nil {
			return nil, err
		}
	}
	resp := &computev1.FlushResponse{TookNanos: int64(time.Since(start))}
	for _, f := range flushed {
		resp.Disks = append(resp.Disks, &computev1.DiskFlush{Disk: f.Disk, Blocks: f.Blocks, Bytes: f.Bytes, Generation: f.Generation})
	}
	return resp, nil
}

// checkDisk makes a flush of a name that is no persistent disk an error
// instead of an empty success.
func (s *cacheService) checkDisk(ctx context.Context, disk string) error {
	m, err := s.p.Image(ctx, disk)
	if err != nil {
		return err
	}
	if !m.Writable {
		return fmt.Errorf("%q is a golden image, not a persistent disk: %w", disk, errdefs.ErrInvalidArgument)
	}
	return nil
}

func (s *cacheService) GetCacheStats(context.Context, *computev1.GetCacheStatsRequest) (*computev1.GetCacheStatsResponse, error) {
	return s.p.StatsProto(), nil
}

func (s *cacheService) DropCaches(context.Context, *computev1.DropCachesRequest) (*computev1.DropCachesResponse, error) {
	blocks, files := s.p.DropCaches()
	return &computev1.DropCachesResponse{BlocksDropped: uint64(blocks), FilesDropped: uint64(files)}, nil
}
