package shop

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/market"
)

// reapInterval is how often destroy orders of lost VMs are looked at.
const reapInterval = 2 * time.Second

// Shop serves ShopService (service.go) over the logic of VMs (vms) and
// tasks (taskRunner).
type Shop struct {
	shopv1.UnimplementedShopServiceServer
	cfg Config
	log *zap.Logger

	session *market.Session // the lease of this shop's claims
	market  *market.Registry
	store   *etcdStore
	plants  *plantPool
	metrics *metrics
	vms     *vms
	tasks   *taskRunner

	stopReaper context.CancelFunc
	reaped     chan struct{}
}

// New returns a shop and registers its metrics. What it started is undone
// in one place when a later step fails.
func New(cfg Config, reg prometheus.Registerer) (_ *Shop, err error) {
	cfg = cfg.withDefaults()
	s := &Shop{cfg: cfg, log: cfg.Logger, plants: newPlantPool(cfg.PlantTLS, cfg.ServiceToken), metrics: newMetrics()}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if s.session, err = market.NewSession(ctx, cfg.Etcd, cfg.SessionTTL); err != nil {
		return nil, fmt.Errorf("%w: %w", err, errdefs.ErrUnavailable)
	}
	// The registry is watched also without a shortlist: it tells which
	// plants are alive (lost VMs) and whose bids count.
	if s.market, err = market.WatchRegistry(ctx, cfg.Etcd, cfg.Logger.Named("registry")); err != nil {
		return nil, fmt.Errorf("%w: %w", err, errdefs.ErrUnavailable)
	}
	if err = s.metrics.register(reg); err != nil {
		return nil, err
	}
	s.store = &etcdStore{cli: cfg.Etcd, sess: s.session}
	s.vms = &vms{cfg: cfg, log: cfg.Logger, store: s.store, plants: s.plants, registry: s.market, metrics: s.metrics,
		net: &networks{s: s.store, log: cfg.Logger}}
	rctx, stop := context.WithCancel(context.Background())
	s.stopReaper, s.reaped = stop, make(chan struct{})
	go func() {
		defer close(s.reaped)
		var wg sync.WaitGroup
		wg.Go(func() { newDrainer(s.vms).run(rctx, drainInterval) })
		s.vms.reap(rctx, reapInterval)
		wg.Wait()
	}()
	return s, nil
}

// startTasks runs tasks until Close: its own and those of dead shops.
func (s *Shop) startTasks() error {
	s.tasks = startTaskRunner(s.store, s.vms, s.log)
	return nil
}

// Close stops running tasks here (other shops take them over) and lets go
// of etcd and the plants. It undoes a half-made shop too.
func (s *Shop) Close() {
	if s.tasks != nil {
		s.tasks.close()
	}
	if s.stopReaper != nil {
		s.stopReaper()
		<-s.reaped
	}
	if s.market != nil {
		s.market.Close()
	}
	if s.session != nil {
		s.session.Close()
	}
	s.plants.Close()
}
