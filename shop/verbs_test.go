package shop

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// The verbs' failure paths, with fake plants that fail on cue and a fake
// image server (the real ones: integration/verbs_test.go).

// verbImages is fakeImages with persistent disks, states and deletes.
type verbImages struct {
	fakeImages
	mu      sync.Mutex
	images  map[string]*imagev1.Manifest
	deleted []string
}

func (f *verbImages) CreateDisk(_ context.Context, req *imagev1.CreateDiskRequest) (*imagev1.CreateDiskResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.images[req.Name] != nil {
		return nil, status.Error(codes.AlreadyExists, "exists")
	}
	m := &imagev1.Manifest{Name: req.Name, Writable: true, BaseImage: req.SourceImage, Attributes: &imagev1.ImageAttributes{Labels: req.Labels}}
	f.images[req.Name] = m
	return &imagev1.CreateDiskResponse{Manifest: m}, nil
}

func (f *verbImages) GetImage(_ context.Context, req *imagev1.GetImageRequest) (*imagev1.GetImageResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if m := f.images[req.Name]; m != nil {
		return &imagev1.GetImageResponse{Manifest: m}, nil
	}
	return nil, status.Error(codes.NotFound, "no such image")
}

func (f *verbImages) DeleteImage(_ context.Context, req *imagev1.DeleteImageRequest) (*imagev1.DeleteImageResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.images, req.Name)
	f.deleted = append(f.deleted, req.Name)
	return &imagev1.DeleteImageResponse{}, nil
}

// verbPlant suspends and resumes (failing the first fail calls of each
// with Unavailable, as a plant whose image server is away).
type verbPlant struct {
	*fakePlant
	fail     int
	suspends int
	resumes  int
}

func (p *verbPlant) CreateVM(req *computev1.CreateVMRequest, stream computev1.PlantService_CreateVMServer) error {
	p.mu.Lock()
	p.vms[req.VmId] = true
	p.mu.Unlock()
	return stream.Send(&computev1.CreateVMProgress{Classad: &computev1.ClassAd{VmId: req.VmId, Owner: req.Owner, Image: req.Image,
		Plant: p.name, State: computev1.VMState_VM_STATE_RUNNING, PersistentDisk: req.PersistentDisk}})
}

func (p *verbPlant) SuspendVM(_ context.Context, req *computev1.SuspendVMRequest) (*computev1.ClassAd, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.suspends++; p.suspends <= p.fail {
		return nil, status.Error(codes.Unavailable, "image server away")
	}
	delete(p.vms, req.VmId)
	return &computev1.ClassAd{VmId: req.VmId, State: computev1.VMState_VM_STATE_SUSPENDED, SuspendedImage: req.VmId + "-state",
		PersistentDisk: req.VmId + "-root"}, nil
}

func (p *verbPlant) ResumeVM(req *computev1.ResumeVMRequest, stream computev1.PlantService_ResumeVMServer) error {
	p.mu.Lock()
	if p.resumes++; p.resumes <= p.fail {
		p.mu.Unlock()
		return status.Error(codes.Unavailable, "image server away")
	}
	p.vms[req.Classad.VmId] = true
	p.mu.Unlock()
	ad := req.Classad
	ad.State, ad.Plant, ad.SuspendedImage = computev1.VMState_VM_STATE_RUNNING, p.name, ""
	return stream.Send(&computev1.CreateVMProgress{Classad: ad})
}

func TestVerbsFailingPartWay(t *testing.T) {
	te := startTestEtcd(t)
	images := &verbImages{images: map[string]*imagev1.Manifest{}}
	ts := startTestShopWith(t, te, Config{}, images)
	a := &verbPlant{fakePlant: &fakePlant{name: "a", vms: map[string]bool{}}, fail: 1}
	b := &verbPlant{fakePlant: &fakePlant{name: "b", vms: map[string]bool{}}, fail: 1}
	a.srv, b.srv = a, b
	runPlant(t, te, a.fakePlant, "", 5)
	runPlant(t, te, b.fakePlant, "", 5)
	ctx := context.Background()
	eventually(t, 5*time.Second, "both plants registered", func() bool {
		_, okA := ts.shop.market.Plant("a")
		_, okB := ts.shop.market.Plant("b")
		return okA && okB
	})

	ad, err := ts.create(ctx, &shopv1.CreateVMRequest{RequestId: "home", Persistent: true})
	if err != nil {
		t.Fatal(err)
	}
	if ad.PersistentDisk != ad.VmId+"-root" || images.images[ad.VmId+"-root"] == nil {
		t.Fatalf("persistent VM %+v, disks %v", ad, images.images)
	}
	state := func() computev1.VMState {
		got, err := ts.client.GetVM(ctx, &shopv1.GetVMRequest{VmId: ad.VmId})
		if err != nil {
			t.Fatal(err)
		}
		return got.State
	}
	// A suspend that fails leaves the VM RUNNING where it was; the retry
	// with the same request id suspends it.
	if _, err := ts.client.SuspendVM(ctx, &shopv1.SuspendVMRequest{VmId: ad.VmId, RequestId: "s"}); codeOf(err) != codes.Unavailable {
		t.Fatalf("suspend on a failing plant: %v", err)
	}
	if s := state(); s != computev1.VMState_VM_STATE_RUNNING {
		t.Fatalf("after a failed suspend: %v", s)
	}
	if _, err := ts.client.SuspendVM(ctx, &shopv1.SuspendVMRequest{VmId: ad.VmId, RequestId: "s"}); err != nil {
		t.Fatal(err)
	}
	if s := state(); s != computev1.VMState_VM_STATE_SUSPENDED {
		t.Fatalf("after the suspend: %v", s)
	}
	// A resume that fails on the plant named leaves it SUSPENDED; the
	// retry asks that plant first, then places it.
	other := map[string]string{"a": "b", "b": "a"}[ad.Plant]
	if _, err := resumeVM(ctx, ts, &shopv1.ResumeVMRequest{VmId: ad.VmId, RequestId: "r", Plant: other}); codeOf(err) != codes.Unavailable {
		t.Fatalf("resume on a failing plant: %v", err)
	}
	if s := state(); s != computev1.VMState_VM_STATE_SUSPENDED {
		t.Fatalf("after a failed resume: %v", s)
	}
	back, err := resumeVM(ctx, ts, &shopv1.ResumeVMRequest{VmId: ad.VmId, RequestId: "r"})
	if err != nil {
		t.Fatal(err)
	}
	if back.State != computev1.VMState_VM_STATE_RUNNING || a.has(ad.VmId) == b.has(ad.VmId) {
		t.Fatalf("resumed %v on %s (on a: %v, b: %v)", back.State, back.Plant, a.has(ad.VmId), b.has(ad.VmId))
	}
	if _, err := ts.client.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: ad.VmId}); err != nil {
		t.Fatal(err)
	}
	if images.images[ad.VmId+"-root"] != nil {
		t.Fatalf("the destroyed VM's disk is left: deleted %v", images.deleted)
	}
}

func resumeVM(ctx context.Context, ts *testShop, req *shopv1.ResumeVMRequest) (*computev1.ClassAd, error) {
	stream, err := ts.client.ResumeVM(ctx, req)
	if err != nil {
		return nil, err
	}
	return untilClassAd(stream.Recv, func(*shopv1.CreateVMProgress) {})
}
