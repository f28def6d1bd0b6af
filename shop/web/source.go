package web

import (
	"context"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/shop/market"
)

// Source is what the events stream shows: the shop implements it.
type Source interface {
	// Overview is what c may see now (Plants left empty: see Plants).
	Overview(ctx context.Context, c auth.Caller) (*Overview, error)
	// Plants are the registered plants, with their current offers.
	Plants() []Plant
	// CacheStats asks the cache service of the plant at addr.
	CacheStats(ctx context.Context, addr string) (*computev1.GetCacheStatsResponse, error)
	// Watch calls each with every change of the VM information system
	// until ctx ends or the watch fails.
	Watch(ctx context.Context, each func(Change)) error
}

// Overview is the grid as one caller may see it.
type Overview struct {
	Plants []Plant
	VMs    []*computev1.ClassAd
	Tasks  []*shopv1.Task
	Images []*imagev1.Manifest
}

// Plant is a registered plant.
type Plant struct {
	market.PlantInfo
	// Offer is the plant's price for a plain VM, from its posted state.
	Offer float64
}

// What changed.
const (
	ChangeVM    = "vm"
	ChangeTask  = "task"
	ChangePlant = "plant"
	ChangeBid   = "bid"
)

// Change is one change of the VM information system.
type Change struct {
	Kind string
	// VMID is the VM of a ChangeVM, or the VM an auction places.
	VMID string
	// Plant is the plant a VM record names (the auction's winner, once
	// recorded).
	Plant string
	// Auction and Bid are a ChangeBid's.
	Auction string
	Bid     *market.Bid
}
