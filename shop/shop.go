// Package shop is the VMShop (VMPlants §3): the single logical point of
// contact. A request is matched against the warehouse (subset, prefix and
// partial-order tests on the golden images' performed actions), placed by
// an auction among the plants (package market), created by the winner, and
// its classad kept in etcd. The shop keeps no state of its own, so any
// number of shops can run and a restarted shop answers as before.
//
// # Idempotency
//
// A request id names a VM for its owner: the VM id is derived from (owner,
// request id), and an etcd transaction records the request before any plant
// is asked, so a retried CreateVM — to this shop or another — returns the
// same VM. The winner is recorded before it is asked to create, and a plant
// creates a VM id only once, so a retry after a crash never makes a second
// VM.
package shop

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/dag"
	"github.com/vmgrid/vmgrid/shop/market"
)

// etcd keys of the VM information system.
const (
	vmsPrefix      = "/vmgrid/vms/"
	requestsPrefix = "/vmgrid/requests/"
	drivingPrefix  = "/vmgrid/driving/"
)

// record is a VM in etcd.
type record struct {
	VMID      string          `json:"vm_id"`
	Owner     string          `json:"owner"`
	RequestID string          `json:"request_id"`
	Stage     string          `json:"stage"` // placing, creating, ready, failed
	Plant     string          `json:"plant,omitempty"`
	PlantAddr string          `json:"plant_addr,omitempty"`
	Image     string          `json:"image,omitempty"`
	ClassAd   json.RawMessage `json:"classad,omitempty"`
	Error     string          `json:"error,omitempty"`
}

func (r *record) classad() *computev1.ClassAd {
	ad := &computev1.ClassAd{}
	if len(r.ClassAd) > 0 {
		_ = protojson.Unmarshal(r.ClassAd, ad)
	}
	if ad.VmId == "" {
		ad.VmId, ad.Owner, ad.Image, ad.Plant, ad.Error = r.VMID, r.Owner, r.Image, r.Plant, r.Error
		switch r.Stage {
		case "failed":
			ad.State = computev1.VMState_VM_STATE_FAILED
		case "placing", "creating":
			ad.State = computev1.VMState_VM_STATE_FETCHING
		}
	}
	return ad
}

// Config configures a Shop.
type Config struct {
	Etcd    *clientv3.Client
	Images  *imageclient.Client
	Weights market.Weights
	// AuctionDeadline bounds the wait for bids (default 500ms).
	AuctionDeadline time.Duration
	// Shortlist is how many plants, the cheapest by their posted offers,
	// are invited to bid (default 8); below zero every plant bids.
	Shortlist int
	PlantTLS  services.TLSFiles
	// DataServer is the data server tasks stage files from and to.
	DataServer string
	Log        *zap.Logger
}

// Shop serves ShopService.
type Shop struct {
	shopv1.UnimplementedShopServiceServer
	cfg Config
	log *zap.Logger

	mu      sync.Mutex
	plants  map[string]computev1.PlantServiceClient
	conns   []*grpc.ClientConn
	tasks   *taskRunner
	session *concurrency.Session // leases of this shop's claims
	market  *market.Registry

	placement prometheus.Histogram
	auctions  *prometheus.CounterVec
}

var _ shopv1.ShopServiceServer = (*Shop)(nil)

// New returns a shop and registers its metrics.
func New(cfg Config, reg prometheus.Registerer) (*Shop, error) {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.AuctionDeadline == 0 {
		cfg.AuctionDeadline = 500 * time.Millisecond
	}
	if cfg.Weights == (market.Weights{}) {
		cfg.Weights = market.DefaultWeights()
	}
	if cfg.Shortlist == 0 {
		cfg.Shortlist = 8
	}
	s := &Shop{cfg: cfg, log: cfg.Log, plants: map[string]computev1.PlantServiceClient{},
		placement: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "vmgrid", Subsystem: "shop", Name: "placement_seconds",
			Help: "Time from a request to its winning plant chosen.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		auctions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "shop", Name: "creates_total", Help: "CreateVM outcomes.",
		}, []string{"result"}),
	}
	sess, err := concurrency.NewSession(cfg.Etcd, concurrency.WithTTL(10))
	if err != nil {
		return nil, fmt.Errorf("etcd session: %v: %w", err, errdefs.ErrUnavailable)
	}
	s.session = sess
	if cfg.Shortlist > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		s.market, err = market.WatchRegistry(ctx, cfg.Etcd, cfg.Log.Named("registry"))
		cancel()
		if err != nil {
			sess.Close()
			return nil, fmt.Errorf("%v: %w", err, errdefs.ErrUnavailable)
		}
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{s.placement, s.auctions} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return s, nil
}

// VMID is the VM id of an owner's request.
func VMID(owner, requestID string) string {
	h := sha256.Sum256([]byte(owner + "\x00" + requestID))
	return "vm-" + hex.EncodeToString(h[:5])
}

func (s *Shop) plant(addr string) (computev1.PlantServiceClient, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.plants[addr]; c != nil {
		return c, nil
	}
	cc, err := services.Dial(addr, s.cfg.PlantTLS)
	if err != nil {
		return nil, err
	}
	s.conns = append(s.conns, cc)
	c := computev1.NewPlantServiceClient(cc)
	s.plants[addr] = c
	return c, nil
}

func (s *Shop) getRecord(ctx context.Context, vmID string) (*record, int64, error) {
	resp, err := s.cfg.Etcd.Get(ctx, vmsPrefix+vmID)
	if err != nil {
		return nil, 0, fmt.Errorf("etcd: %v: %w", err, errdefs.ErrUnavailable)
	}
	if len(resp.Kvs) == 0 {
		return nil, resp.Header.Revision, fmt.Errorf("vm %q: %w", vmID, errdefs.ErrNotFound)
	}
	var r record
	if err := json.Unmarshal(resp.Kvs[0].Value, &r); err != nil {
		return nil, 0, err
	}
	return &r, resp.Header.Revision, nil
}

func (s *Shop) putRecord(ctx context.Context, r *record) error {
	b, _ := json.Marshal(r)
	_, err := s.cfg.Etcd.Put(ctx, vmsPrefix+r.VMID, string(b))
	return err
}

// owned returns the record of a VM of the caller's.
func (s *Shop) owned(ctx context.Context, vmID string) (*record, error) {
	owner, err := auth.Owner(ctx)
	if err != nil {
		return nil, err
	}
	r, _, err := s.getRecord(ctx, vmID)
	if err != nil {
		return nil, err
	}
	if r.Owner != owner {
		return nil, fmt.Errorf("vm %q belongs to another owner: %w", vmID, errdefs.ErrPermissionDenied)
	}
	return r, nil
}

// CreateVM implements ShopService.CreateVM.
func (s *Shop) CreateVM(req *shopv1.CreateVMRequest, stream shopv1.ShopService_CreateVMServer) error {
	ctx := stream.Context()
	start := time.Now()
	owner, err := auth.Owner(ctx)
	if err != nil {
		return err
	}
	send := func(p *shopv1.CreateVMProgress) {
		p.ElapsedNanos = int64(time.Since(start))
		_ = stream.Send(p)
	}
	// The creation goes on if the client goes away: a retry of the request
	// then finds the VM ready instead of half made.
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Minute)
	defer cancel()
	ad, err := s.create(dctx, owner, req, send)
	if err != nil {
		return err
	}
	send(&shopv1.CreateVMProgress{Stage: "ready", Message: "ready on " + ad.Plant, State: ad.State, Image: ad.Image, Classad: ad})
	return nil
}

// create makes (or, for a known request, finds) an owner's VM.
func (s *Shop) create(ctx context.Context, owner string, req *shopv1.CreateVMRequest, send func(*shopv1.CreateVMProgress)) (*computev1.ClassAd, error) {
	if _, err := dag.New(req.Config); err != nil {
		return nil, fmt.Errorf("config: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	vmID := VMID(owner, req.RequestId)
	reqKey := requestsPrefix + owner + "/" + req.RequestId
	fresh := &record{VMID: vmID, Owner: owner, RequestID: req.RequestId, Stage: "placing"}
	b, _ := json.Marshal(fresh)
	txn, err := s.cfg.Etcd.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(reqKey), "=", 0)).
		Then(clientv3.OpPut(reqKey, vmID), clientv3.OpPut(vmsPrefix+vmID, string(b))).
		Commit()
	if err != nil {
		return nil, fmt.Errorf("etcd: %v: %w", err, errdefs.ErrUnavailable)
	}
	rec := fresh
	if !txn.Succeeded {
		// A retry: the request is known.
		if rec, _, err = s.getRecord(ctx, vmID); err != nil {
			if errdefs.IsNotFound(err) {
				return nil, fmt.Errorf("request %q created vm %s, which was destroyed since; use a new request id: %w", req.RequestId, vmID, errdefs.ErrFailedPrecondition)
			}
			return nil, err
		}
		switch rec.Stage {
		case "ready":
			return rec.classad(), nil
		case "failed":
			return nil, fmt.Errorf("request %q failed before: %s; use a new request id: %w", req.RequestId, rec.Error, errdefs.ErrFailedPrecondition)
		}
		// Placing or creating: another call drives it, or drove it and
		// died; see claim.
	}
	// One driver per VM at a time: concurrent retries wait for it, and take
	// over when its shop dies (the claim goes with the shop's lease).
	claimed, ad, err := s.claimOrWait(ctx, vmID)
	if err != nil || !claimed {
		return ad, err
	}
	defer s.cfg.Etcd.Delete(context.WithoutCancel(ctx), drivingPrefix+vmID)
	if rec, _, err = s.getRecord(ctx, vmID); err != nil {
		return nil, err
	}
	if rec.Stage == "ready" {
		return rec.classad(), nil
	}
	ad, err = s.drive(ctx, req, rec, send)
	if err != nil {
		s.auctions.WithLabelValues("failed").Inc()
		// A definitive failure is remembered; an outage is not (a retry
		// may succeed).
		if !errdefs.IsUnavailable(err) && ctx.Err() == nil {
			rec.Stage, rec.Error = "failed", err.Error()
			_ = s.putRecord(context.Background(), rec)
		}
		return nil, err
	}
	s.auctions.WithLabelValues("created").Inc()
	return ad, nil
}

// drive matches, auctions and creates.
func (s *Shop) drive(ctx context.Context, req *shopv1.CreateVMRequest, rec *record, send func(*shopv1.CreateVMProgress)) (*computev1.ClassAd, error) {
	start := time.Now()
	image, size, hw, err := s.match(ctx, req)
	if err != nil {
		return nil, err
	}
	send(&shopv1.CreateVMProgress{Stage: "matching", Message: "golden image " + image, Image: image})
	rec.Image = image

	var bids []market.Bid
	if rec.Stage == "creating" && rec.PlantAddr != "" {
		// A previous attempt chose a plant: ask it first.
		bids = append(bids, market.Bid{Plant: rec.Plant, Addr: rec.PlantAddr})
	}
	w := s.cfg.Weights
	a := market.Auction{ID: rec.VMID + "-" + fmt.Sprint(time.Now().UnixNano()), Image: image, ImageSize: size,
		Arch: hw.Arch, VCPUs: hw.Vcpus, MemoryMiB: hw.MemoryMib, Domain: req.NetworkDomain, Weights: &w}
	got, err := s.auction(ctx, a)
	if err != nil {
		return nil, fmt.Errorf("auction: %v: %w", err, errdefs.ErrUnavailable)
	}
	s.placement.Observe(time.Since(start).Seconds())
	bids = append(bids, got...)
	pb := make([]*shopv1.Bid, 0, len(got))
	for _, b := range got {
		pb = append(pb, &shopv1.Bid{Plant: b.Plant, Cost: b.Cost, Refusal: b.Refusal})
	}
	send(&shopv1.CreateVMProgress{Stage: "bidding", Message: fmt.Sprintf("%d bids", len(got)), Bids: pb})
	if len(got) == 0 && len(bids) == 0 {
		return nil, fmt.Errorf("no plant is registered: %w", errdefs.ErrResourceExhausted)
	}
	var tried []string
	for _, b := range bids {
		if b.Refusal != "" {
			continue
		}
		rec.Stage, rec.Plant, rec.PlantAddr = "creating", b.Plant, b.Addr
		if err := s.putRecord(ctx, rec); err != nil {
			return nil, fmt.Errorf("etcd: %v: %w", err, errdefs.ErrUnavailable)
		}
		send(&shopv1.CreateVMProgress{Stage: "creating", Message: "plant " + b.Plant + " won"})
		ad, err := s.createOn(ctx, b, req, rec, image, send)
		if err == nil {
			ad.Labels = mergeLabels(ad.Labels, req.Labels)
			adj, _ := protojson.Marshal(ad)
			rec.Stage, rec.ClassAd, rec.Error = "ready", adj, ""
			if err := s.putRecord(ctx, rec); err != nil {
				return nil, fmt.Errorf("etcd: %v: %w", err, errdefs.ErrUnavailable)
			}
			return ad, nil
		}
		if !errdefs.IsUnavailable(err) && !errors.Is(err, context.DeadlineExceeded) && !errdefs.IsNotFound(err) {
			return nil, err // the request itself failed (an action, the image)
		}
		s.log.Warn("winner failed; trying the next bid", zap.String("plant", b.Plant), zap.Error(err))
		tried = append(tried, fmt.Sprintf("%s: %v", b.Plant, err))
	}
	reason := market.Refusals(got)
	if len(tried) > 0 {
		reason = fmt.Sprintf("%s; winners that failed: %v", reason, tried)
	}
	return nil, fmt.Errorf("no plant can host the VM: %s: %w", reason, errdefs.ErrResourceExhausted)
}

// auction places a among the plants (market.Place).
func (s *Shop) auction(ctx context.Context, a market.Auction) ([]market.Bid, error) {
	bids, open, err := market.Place(ctx, s.cfg.Etcd, s.market, a, s.cfg.Shortlist, s.cfg.AuctionDeadline)
	if open {
		s.log.Info("no invited plant could host the VM; every plant was asked", zap.String("auction", a.ID))
	}
	return bids, err
}

func mergeLabels(a, b map[string]string) map[string]string {
	if len(b) == 0 {
		return a
	}
	if a == nil {
		a = map[string]string{}
	}
	for k, v := range b {
		a[k] = v
	}
	return a
}

func (s *Shop) createOn(ctx context.Context, b market.Bid, req *shopv1.CreateVMRequest, rec *record, image string, send func(*shopv1.CreateVMProgress)) (*computev1.ClassAd, error) {
	c, err := s.plant(b.Addr)
	if err != nil {
		return nil, err
	}
	labels := mergeLabels(map[string]string{}, req.Labels)
	if req.NetworkDomain != "" {
		labels["domain"] = req.NetworkDomain
	}
	stream, err := c.CreateVM(ctx, &computev1.CreateVMRequest{
		VmId: rec.VMID, Owner: rec.Owner, Image: image, Hardware: req.Hardware, Config: req.Config, Labels: labels,
	})
	if err != nil {
		return nil, err
	}
	for {
		p, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		if p.Classad != nil {
			return p.Classad, nil
		}
		send(&shopv1.CreateVMProgress{Stage: "creating", State: p.State, Message: b.Plant + ": " + p.Message})
	}
}

// match finds the golden image for a request: right hardware, performed
// actions passing the subset, prefix and partial-order tests, the most
// actions already done.
func (s *Shop) match(ctx context.Context, req *shopv1.CreateVMRequest) (string, uint64, *computev1.Hardware, error) {
	hw := req.Hardware
	if hw == nil {
		hw = &computev1.Hardware{}
	}
	list, err := s.cfg.Images.API.ListImages(ctx, &imagev1.ListImagesRequest{Kind: imagev1.ListImagesRequest_KIND_GOLDEN, Arch: hw.Arch})
	if err != nil {
		return "", 0, nil, err
	}
	type cand struct {
		m    *imagev1.Manifest
		done int
	}
	plan, err := dag.New(req.Config)
	if err != nil {
		return "", 0, nil, fmt.Errorf("config: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	var cands []cand
	var why []string
	for _, m := range list.Images {
		if req.Image != "" && m.Name != req.Image {
			continue
		}
		a := m.GetAttributes()
		if hw.Vcpus != 0 && hw.Vcpus != a.GetVcpus() || hw.MemoryMib != 0 && hw.MemoryMib != a.GetMemoryMib() {
			why = append(why, fmt.Sprintf("%s has %d vCPUs and %d MiB", m.Name, a.GetVcpus(), a.GetMemoryMib()))
			continue
		}
		if !hasFile(m, "vm.json") {
			continue // not an image a plant can run
		}
		var performed []string
		for _, act := range a.GetActions() {
			performed = append(performed, act.Digest)
		}
		if _, err := plan.Match(performed); err != nil {
			why = append(why, fmt.Sprintf("%s: %v", m.Name, err))
			continue
		}
		cands = append(cands, cand{m, len(performed)})
	}
	if len(cands) == 0 {
		if req.Image != "" && len(why) == 0 {
			return "", 0, nil, fmt.Errorf("image %q is not a golden image of the warehouse: %w", req.Image, errdefs.ErrNotFound)
		}
		return "", 0, nil, fmt.Errorf("no golden image matches the request (%v): %w", why, errdefs.ErrFailedPrecondition)
	}
	sort.SliceStable(cands, func(i, j int) bool { return cands[i].done > cands[j].done })
	m := cands[0].m
	var size uint64
	for _, f := range m.Files {
		size += f.NonzeroBytes
	}
	out := &computev1.Hardware{Arch: m.GetAttributes().GetArch(), Vcpus: m.GetAttributes().GetVcpus(), MemoryMib: m.GetAttributes().GetMemoryMib()}
	return m.Name, size, out, nil
}

func hasFile(m *imagev1.Manifest, name string) bool {
	for _, f := range m.Files {
		if f.Name == name {
			return true
		}
	}
	return false
}

// GetVM implements ShopService.GetVM.
func (s *Shop) GetVM(ctx context.Context, req *shopv1.GetVMRequest) (*computev1.ClassAd, error) {
	r, err := s.owned(ctx, req.VmId)
	if err != nil {
		return nil, err
	}
	return s.check(ctx, r), nil
}

// check asks the plant of a ready VM whether it still has it: a plant that
// restarted stopped its VMs, and the classad in etcd would otherwise claim
// a VM that no longer runs.
func (s *Shop) check(ctx context.Context, r *record) *computev1.ClassAd {
	ad := r.classad()
	if r.Stage != "ready" || r.PlantAddr == "" {
		return ad
	}
	c, err := s.plant(r.PlantAddr)
	if err != nil {
		return ad
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := c.GetVM(cctx, &computev1.GetVMRequest{VmId: r.VMID}); errdefs.IsNotFound(err) {
		ad.State = computev1.VMState_VM_STATE_FAILED
		ad.Error = "plant " + r.Plant + " no longer runs this VM (it restarted or lost it); destroy it and create another"
	}
	return ad
}

// ListVMs implements ShopService.ListVMs.
func (s *Shop) ListVMs(ctx context.Context, _ *shopv1.ListVMsRequest) (*shopv1.ListVMsResponse, error) {
	owner, err := auth.Owner(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := s.cfg.Etcd.Get(ctx, vmsPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("etcd: %v: %w", err, errdefs.ErrUnavailable)
	}
	out := &shopv1.ListVMsResponse{}
	for _, kv := range resp.Kvs {
		var r record
		if json.Unmarshal(kv.Value, &r) == nil && r.Owner == owner {
			out.Vms = append(out.Vms, s.check(ctx, &r))
		}
	}
	return out, nil
}

// DestroyVM implements ShopService.DestroyVM.
func (s *Shop) DestroyVM(ctx context.Context, req *shopv1.DestroyVMRequest) (*shopv1.DestroyVMResponse, error) {
	r, err := s.owned(ctx, req.VmId)
	if err != nil {
		return nil, err
	}
	return &shopv1.DestroyVMResponse{}, s.destroy(ctx, r)
}

func (s *Shop) destroy(ctx context.Context, r *record) error {
	if r.PlantAddr != "" {
		c, err := s.plant(r.PlantAddr)
		if err != nil {
			return err
		}
		if _, err := c.DestroyVM(ctx, &computev1.DestroyVMRequest{VmId: r.VMID}); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("plant %s: %w", r.Plant, err)
		}
	}
	if _, err := s.cfg.Etcd.Delete(ctx, vmsPrefix+r.VMID); err != nil {
		return fmt.Errorf("etcd: %v: %w", err, errdefs.ErrUnavailable)
	}
	return nil
}

// WatchVM implements ShopService.WatchVM.
func (s *Shop) WatchVM(req *shopv1.WatchVMRequest, stream shopv1.ShopService_WatchVMServer) error {
	ctx := stream.Context()
	r, err := s.owned(ctx, req.VmId)
	if err != nil {
		return err
	}
	_, rev, err := s.getRecord(ctx, req.VmId)
	if err != nil {
		return err
	}
	if err := stream.Send(r.classad()); err != nil {
		return err
	}
	for resp := range s.cfg.Etcd.Watch(clientv3.WithRequireLeader(ctx), vmsPrefix+req.VmId, clientv3.WithRev(rev+1)) {
		if err := resp.Err(); err != nil {
			return fmt.Errorf("etcd watch: %v: %w", err, errdefs.ErrUnavailable)
		}
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypeDelete {
				ad := r.classad()
				ad.State = computev1.VMState_VM_STATE_DESTROYED
				return stream.Send(ad)
			}
			var nr record
			if json.Unmarshal(ev.Kv.Value, &nr) == nil {
				r = &nr
				if err := stream.Send(nr.classad()); err != nil {
					return err
				}
			}
		}
	}
	return ctx.Err()
}

// claimOrWait makes this shop the driver of a VM's creation, or waits for
// the driver to finish: it returns claimed, or the VM's classad (or its
// failure) as the driver left it.
func (s *Shop) claimOrWait(ctx context.Context, vmID string) (bool, *computev1.ClassAd, error) {
	key := drivingPrefix + vmID
	for {
		txn, err := s.cfg.Etcd.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, "", clientv3.WithLease(s.session.Lease()))).
			Else(clientv3.OpGet(key)).Commit()
		if err != nil {
			return false, nil, fmt.Errorf("etcd: %v: %w", err, errdefs.ErrUnavailable)
		}
		if txn.Succeeded {
			return true, nil, nil
		}
		// Wait until the driver is done (or gone), then look again.
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		wch := s.cfg.Etcd.Watch(wctx, key, clientv3.WithRev(txn.Header.Revision+1))
		for resp := range wch {
			if done := func() bool {
				for _, ev := range resp.Events {
					if ev.Type == clientv3.EventTypeDelete {
						return true
					}
				}
				return false
			}(); done {
				break
			}
		}
		cancel()
		if ctx.Err() != nil {
			return false, nil, ctx.Err()
		}
		r, _, err := s.getRecord(ctx, vmID)
		if err != nil {
			return false, nil, err
		}
		switch r.Stage {
		case "ready":
			return false, r.classad(), nil
		case "failed":
			return false, nil, fmt.Errorf("vm %s failed: %s: %w", vmID, r.Error, errdefs.ErrFailedPrecondition)
		}
	}
}
