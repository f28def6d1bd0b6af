package dataserver

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Service is the gRPC adapter of the data repository over a Store. Every
// call acts for the owner the auth interceptors put in its context.
type Service struct {
	datav1.UnimplementedDataServiceServer
	store *Store
	log   *zap.Logger
	m     *metrics
}

var _ datav1.DataServiceServer = (*Service)(nil)

type metrics struct {
	bytesIn  prometheus.Counter
	bytesOut prometheus.Counter
	uploads  *prometheus.CounterVec
	deletes  prometheus.Counter
}

// NewService returns the DataService over store and registers its metrics.
func NewService(store *Store, log *zap.Logger, reg prometheus.Registerer) (*Service, error) {
	log = services.LoggerOr(log)
	m := &metrics{
		bytesIn: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "dataserver", Name: "bytes_received_total",
			Help: "File bytes received by Upload (committed or not).",
		}),
		bytesOut: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "dataserver", Name: "bytes_sent_total",
			Help: "File bytes sent by Download.",
		}),
		uploads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "dataserver", Name: "uploads_total",
			Help: "Uploads by result (stored, failed).",
		}, []string{"result"}),
		deletes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "dataserver", Name: "files_deleted_total",
			Help: "Files deleted.",
		}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.bytesIn, m.bytesOut, m.uploads, m.deletes} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return &Service{store: store, log: log, m: m}, nil
}

// Register adds the service to a gRPC server.
func (s *Service) Register(gs *grpc.Server) { datav1.RegisterDataServiceServer(gs, s) }

// reader returns the caller of a read of owner's files ("" is the
// caller's own). A task credential reads its owner's files only, not what
// other owners granted that owner: it is scoped to one owner's task.
func reader(ctx context.Context, owner string) (string, error) {
	c, err := auth.CallerOf(ctx)
	if err != nil {
		return "", err
	}
	if c.Role == auth.RoleTask && owner != "" && owner != c.Name {
		return "", fmt.Errorf("the credential of task %q reads only %q's files, not %q's: %w", c.Task, c.Name, owner, errdefs.ErrPermissionDenied)
	}
	return c.Name, nil
}

// Upload implements DataService.Upload.
func (s *Service) Upload(stream datav1.DataService_UploadServer) (err error) {
	c, err := auth.CallerOf(stream.Context())
	if err != nil {
		return err
	}
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	h := first.GetHeader()
	if h == nil {
		return fmt.Errorf("the first upload message must be the header: %w", errdefs.ErrInvalidArgument)
	}
	if !c.TaskMayWrite(h.Path) {
		return fmt.Errorf("the credential of task %q writes only under %q, not %q: %w", c.Task, auth.TaskOutputPrefix(c.Task), h.Path, errdefs.ErrPermissionDenied)
	}
	up, err := s.store.BeginUpload(c.Name, h.Owner, h.Path, h.SizeHint)
	if err != nil {
		return err
	}
	defer func() {
		up.Abort() // no-op after a successful commit
		if err != nil {
			s.m.uploads.WithLabelValues("failed").Inc()
		}
	}()
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("the upload of %q ended without a commit after %d bytes; nothing was stored: %w", h.Path, up.Received(), errdefs.ErrInvalidArgument)
		}
		if err != nil {
			return err
		}
		switch m := req.Msg.(type) {
		case *datav1.UploadRequest_Header:
			return fmt.Errorf("a second header in one upload: %w", errdefs.ErrInvalidArgument)
		case *datav1.UploadRequest_Data:
			if err := up.Write(m.Data); err != nil {
				return err
			}
			s.m.bytesIn.Add(float64(len(m.Data)))
		case *datav1.UploadRequest_Commit:
			info, err := up.Commit(m.Commit.Size, m.Commit.Sha256)
			if err != nil {
				return err
			}
			s.m.uploads.WithLabelValues("stored").Inc()
			return stream.SendAndClose(&datav1.UploadResponse{File: info})
		}
	}
}

var chunkPool = sync.Pool{New: func() any { b := make([]byte, datav1.ChunkSize); return &b }}

// Download implements DataService.Download.
func (s *Service) Download(req *datav1.DownloadRequest, stream datav1.DataService_DownloadServer) error {
	caller, err := reader(stream.Context(), req.Owner)
	if err != nil {
		return err
	}
	f, info, err := s.store.Open(caller, req.Owner, req.Path)
	if err != nil {
		return err
	}
	defer f.Close()
	if len(req.IfSha256) > 0 && !bytes.Equal(req.IfSha256, info.Sha256) {
		return fmt.Errorf("%s changed: its sha256 is now %s, not %s; download it again from the start: %w",
			req.Path, hex.EncodeToString(info.Sha256), hex.EncodeToString(req.IfSha256), errdefs.ErrFailedPrecondition)
	}
	if req.Offset > info.Size {
		return fmt.Errorf("offset %d is past the end of %s (%d bytes): %w", req.Offset, req.Path, info.Size, errdefs.ErrOutOfRange)
	}
	end := info.Size
	if req.Length > 0 {
		end = min(end, req.Offset+req.Length)
	}
	bp := chunkPool.Get().(*[]byte)
	defer chunkPool.Put(bp)
	buf := *bp
	resp := &datav1.DownloadResponse{File: info, Offset: req.Offset}
	for off := req.Offset; ; {
		n := min(uint64(len(buf)), end-off)
		if n > 0 {
			got, err := f.ReadAt(buf[:n], int64(off))
			if uint64(got) != n {
				// Files are replaced by rename, never changed in place.
				return fmt.Errorf("%s: read %d of %d bytes at %d (%w): the stored file is damaged: %w", req.Path, got, n, off, err, errdefs.ErrDataLoss)
			}
		}
		resp.Offset, resp.Data = off, buf[:n]
		s.m.bytesOut.Add(float64(n)) // before Send: what a client has, the counter has
		if err := stream.Send(resp); err != nil {
			return err
		}
		resp.File = nil
		off += n
		if off >= end {
			return nil
		}
	}
}

// List implements DataService.List.
func (s *Service) List(ctx context.Context, req *datav1.ListRequest) (*datav1.ListResponse, error) {
	caller, err := reader(ctx, req.Owner)
	if err != nil {
		return nil, err
	}
	limit := int(req.PageSize)
	if limit == 0 {
		limit = datav1.DefaultPageSize
	}
	files, next, err := s.store.List(caller, req.Owner, req.Prefix, req.PageToken, limit)
	if err != nil {
		return nil, err
	}
	return &datav1.ListResponse{Files: files, NextPageToken: next}, nil
}

// Stat implements DataService.Stat.
func (s *Service) Stat(ctx context.Context, req *datav1.StatRequest) (*datav1.StatResponse, error) {
	caller, err := reader(ctx, req.Owner)
	if err != nil {
		return nil, err
	}
	info, err := s.store.Stat(caller, req.Owner, req.Path)
	if err != nil {
		return nil, err
	}
	return &datav1.StatResponse{File: info}, nil
}

// Delete implements DataService.Delete.
func (s *Service) Delete(ctx context.Context, req *datav1.DeleteRequest) (*datav1.DeleteResponse, error) {
	caller, err := auth.Owner(ctx)
	if err != nil {
		return nil, err
	}
	if err := s.store.Delete(caller, req.Owner, req.Path); err != nil {
		return nil, err
	}
	s.m.deletes.Inc()
	return &datav1.DeleteResponse{}, nil
}

// Grant implements DataService.Grant.
func (s *Service) Grant(ctx context.Context, req *datav1.GrantRequest) (*datav1.GrantResponse, error) {
	caller, err := auth.Owner(ctx)
	if err != nil {
		return nil, err
	}
	return &datav1.GrantResponse{}, s.store.Grant(caller, req.Grantee, req.Prefix)
}

// Revoke implements DataService.Revoke.
func (s *Service) Revoke(ctx context.Context, req *datav1.RevokeRequest) (*datav1.RevokeResponse, error) {
	caller, err := auth.Owner(ctx)
	if err != nil {
		return nil, err
	}
	return &datav1.RevokeResponse{}, s.store.Revoke(caller, req.Grantee, req.Prefix)
}

// ListGrants implements DataService.ListGrants.
func (s *Service) ListGrants(ctx context.Context, _ *datav1.ListGrantsRequest) (*datav1.ListGrantsResponse, error) {
	caller, err := auth.Owner(ctx)
	if err != nil {
		return nil, err
	}
	given, received := s.store.Grants(caller)
	return &datav1.ListGrantsResponse{Given: given, Received: received}, nil
}
