package computeserver

import (
	"context"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

// plantService is the gRPC adapter of the production line.
type plantService struct {
	computev1.UnimplementedPlantServiceServer
	p      *plant.Plant
	images *imageclient.Client
}

var _ computev1.PlantServiceServer = (*plantService)(nil)

// progressSender streams progress; sending failures end the call through
// the context, so they are ignored here.
func progressSender(start time.Time, send func(*computev1.CreateVMProgress) error) plant.Progress {
	return func(state computev1.VMState, msg string) {
		_ = send(&computev1.CreateVMProgress{State: state, Message: msg, ElapsedNanos: int64(time.Since(start))})
	}
}

// CreateVM creates a VM for req.Owner. The plant believes the owner a
// request names only because auth.PlantPolicy admits services (the shop,
// which authenticated the owner) and operators alone: an owner's token never
// gets here, so no one forges another owner's VM.
func (s *plantService) CreateVM(req *computev1.CreateVMRequest, stream computev1.PlantService_CreateVMServer) error {
	start := time.Now()
	ad, err := s.p.CreateVM(stream.Context(), req, progressSender(start, stream.Send))
	if err != nil {
		return err
	}
	return stream.Send(&computev1.CreateVMProgress{State: ad.State, Message: "ready", ElapsedNanos: int64(time.Since(start)), Classad: ad})
}

func (s *plantService) ResumeVM(req *computev1.ResumeVMRequest, stream computev1.PlantService_ResumeVMServer) error {
	start := time.Now()
	ad, err := s.p.ResumeVM(stream.Context(), req, progressSender(start, stream.Send))
	if err != nil {
		return err
	}
	return stream.Send(&computev1.CreateVMProgress{State: ad.State, Message: "ready", ElapsedNanos: int64(time.Since(start)), Classad: ad})
}

func (s *plantService) GetVM(_ context.Context, req *computev1.GetVMRequest) (*computev1.ClassAd, error) {
	return s.p.GetVM(req.VmId)
}

func (s *plantService) ListVMs(_ context.Context, req *computev1.ListVMsRequest) (*computev1.ListVMsResponse, error) {
	// req.Owner is the shop's word, as in CreateVM.
	return &computev1.ListVMsResponse{Vms: s.p.ListVMs(req.Owner)}, nil
}

func (s *plantService) DestroyVM(ctx context.Context, req *computev1.DestroyVMRequest) (*computev1.DestroyVMResponse, error) {
	return &computev1.DestroyVMResponse{}, s.p.DestroyVM(ctx, req.VmId)
}

func (s *plantService) SuspendVM(ctx context.Context, req *computev1.SuspendVMRequest) (*computev1.ClassAd, error) {
	return s.p.SuspendVM(ctx, req.VmId, s.images)
}

func (s *plantService) ExecVM(ctx context.Context, req *computev1.ExecVMRequest) (*computev1.ExecVMResponse, error) {
	return s.p.Exec(ctx, req.VmId, req.Exec)
}

func (s *plantService) StageOut(ctx context.Context, req *computev1.StageOutRequest) (*computev1.StageOutResponse, error) {
	up, err := s.p.StageOut(ctx, req)
	if err != nil {
		return nil, err
	}
	return &computev1.StageOutResponse{Uploaded: up}, nil
}

func (s *plantService) PublishVM(ctx context.Context, req *computev1.PublishVMRequest) (*computev1.PublishVMResponse, error) {
	return s.p.PublishVM(ctx, req, s.images)
}

// MigrateVM moves a VM to the destination the shop names (plant/migrate.go).
func (s *plantService) MigrateVM(req *computev1.MigrateVMRequest, stream computev1.PlantService_MigrateVMServer) error {
	start := time.Now()
	ad, err := s.p.MigrateVM(stream.Context(), req, func(phase, msg string, stats *computev1.MigrationStats) {
		_ = stream.Send(&computev1.MigrateVMProgress{Phase: phase, Message: msg, ElapsedNanos: int64(time.Since(start)), Stats: stats})
	})
	if err != nil {
		return err
	}
	return stream.Send(&computev1.MigrateVMProgress{Phase: "running", Message: "running on " + ad.Plant, ElapsedNanos: int64(time.Since(start)),
		Stats: ad.LastMigration, Classad: ad})
}

// DrainPlant marks the plant draining (plant/drain.go); the shops move
// its VMs away.
func (s *plantService) DrainPlant(context.Context, *computev1.DrainPlantRequest) (*computev1.DrainPlantResponse, error) {
	return &computev1.DrainPlantResponse{Vms: uint32(s.p.StartDraining())}, nil
}

// MigrateIn receives a VM from another plant (plant/migratein.go).
func (s *plantService) MigrateIn(stream computev1.PlantService_MigrateInServer) error {
	return s.p.MigrateIn(stream)
}

// MigrationTunnel carries one of QEMU's migration streams (plant/tunnel.go).
func (s *plantService) MigrationTunnel(stream computev1.PlantService_MigrationTunnelServer) error {
	return s.p.ServeTunnel(stream.Context(), stream)
}
