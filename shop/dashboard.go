package shop

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/shop/market"
	"github.com/vmgrid/vmgrid/shop/web"
)

// The shop as the dashboard's source (web.Source): what a caller may see
// of the VM information system, the plants' caches through the shop's own
// plant connections, and the changes in etcd.

var _ web.Source = (*Shop)(nil)

// Overview implements web.Source: owners see their VMs and tasks,
// operators everyone's; the images are the warehouse's.
func (s *Shop) Overview(ctx context.Context, c auth.Caller) (*web.Overview, error) {
	vms, err := s.vms.list(ctx, c.Sees)
	if err != nil {
		return nil, err
	}
	o := &web.Overview{VMs: vms}
	tasks, err := s.store.tasks(ctx)
	if err != nil {
		return nil, err
	}
	for _, t := range tasks {
		if c.Sees(t.Owner) {
			o.Tasks = append(o.Tasks, t)
		}
	}
	images, err := s.cfg.Images.API.ListImages(ctx, &imagev1.ListImagesRequest{})
	if err != nil {
		return nil, fmt.Errorf("image server: %w", err)
	}
	o.Images = images.Images
	return o, nil
}

// Plants implements web.Source.
func (s *Shop) Plants() []web.Plant {
	var out []web.Plant
	for _, p := range s.market.Plants() {
		// The offer is the price of a plain VM as the plant posted its
		// state: in a new network, nothing of it cached.
		offer, _ := market.Cost(s.cfg.Weights, p, market.Auction{})
		out = append(out, web.Plant{PlantInfo: p, Offer: offer})
	}
	return out
}

// CacheStats implements web.Source, over the shop's plant connection.
func (s *Shop) CacheStats(ctx context.Context, plantAddr string) (*computev1.GetCacheStatsResponse, error) {
	c, err := s.plants.cache(plantAddr)
	if err != nil {
		return nil, err
	}
	return c.GetCacheStats(ctx, &computev1.GetCacheStatsRequest{})
}

// Watch implements web.Source: every change of a VM, task, plant or bid
// in etcd from now on, until ctx ends or the watch fails.
func (s *Shop) Watch(ctx context.Context, each func(web.Change)) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for resp := range s.cfg.Etcd.Watch(wctx, "/vmgrid/", clientv3.WithPrefix()) {
		if err := resp.Err(); err != nil {
			return etcdErr(err)
		}
		for _, ev := range resp.Events {
			if ch, ok := change(string(ev.Kv.Key), ev.Kv.Value, ev.Type == clientv3.EventTypeDelete); ok {
				each(ch)
			}
		}
	}
	return ctx.Err()
}

// change classifies an etcd event for the dashboard.
func change(key string, value []byte, deleted bool) (web.Change, bool) {
	switch {
	case strings.HasPrefix(key, vmsPrefix):
		ch := web.Change{Kind: web.ChangeVM, VMID: strings.TrimPrefix(key, vmsPrefix)}
		if r, err := decodeRecord(value); err == nil && !deleted {
			ch.Plant = r.Plant
		}
		return ch, true
	case strings.HasPrefix(key, tasksPrefix):
		return web.Change{Kind: web.ChangeTask}, true
	case strings.HasPrefix(key, market.PlantsPrefix):
		return web.Change{Kind: web.ChangePlant}, true
	case strings.HasPrefix(key, market.BidsPrefix) && !deleted:
		auction, _, _ := strings.Cut(strings.TrimPrefix(key, market.BidsPrefix), "/")
		var b market.Bid
		if json.Unmarshal(value, &b) != nil {
			return web.Change{}, false
		}
		// drive names an auction VMID-NANOS.
		vmID := auction[:max(strings.LastIndexByte(auction, '-'), 0)]
		return web.Change{Kind: web.ChangeBid, Auction: auction, VMID: vmID, Bid: &b}, true
	}
	return web.Change{}, false
}
