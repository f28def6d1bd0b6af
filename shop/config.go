package shop

import (
	"time"

	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/shop/market"
)

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
	// ServiceToken is the shop's identity (role service) at the plants.
	ServiceToken string
	// TaskKey signs the task credentials a plant stages files with (one
	// owner, one task or request, short-lived); without it no stage_in runs.
	TaskKey auth.TaskKey
	// DataServer is the data server tasks stage files from and to.
	DataServer string
	// FailedTTL is how long the records of a failed request are kept (a
	// retry with its id answers the failure meanwhile; default an hour).
	FailedTTL time.Duration
	// SessionTTL is the TTL in seconds of the lease the shop's claims hang
	// off: a dead shop's claims are taken over after it (default 10).
	SessionTTL int
	Logger     *zap.Logger
}

// DefaultConfig is the shop's settings as `vmgrid shop` starts it.
func DefaultConfig() Config {
	return Config{Weights: market.DefaultWeights(), AuctionDeadline: 500 * time.Millisecond, Shortlist: 8,
		FailedTTL: time.Hour, SessionTTL: 10}
}

// AddFlags registers the shop's own flags (the CLI adds the server's,
// etcd's and the image server's) with DefaultConfig's values.
func (c *Config) AddFlags(fs *pflag.FlagSet) {
	d := DefaultConfig()
	fs.DurationVar(&c.AuctionDeadline, "auction-deadline", d.AuctionDeadline, "how long to wait for bids")
	fs.IntVar(&c.Shortlist, "auction-shortlist", d.Shortlist, "invite the N plants (at most 100) whose registered offers cost least (0: every plant bids)")
	fs.StringVar(&c.DataServer, "dataserver", d.DataServer, "data server that tasks stage files with (empty: no tasks)")
	fs.Float64Var(&c.Weights.Compute, "cost-compute", d.Weights.Compute, "bid cost per VM running on a plant")
	fs.Float64Var(&c.Weights.Network, "cost-network", d.Weights.Network, "bid cost of a new host-only network for a client domain")
	fs.Float64Var(&c.Weights.CachePerGiB, "cost-cache-per-gib", d.Weights.CachePerGiB, "bid discount per GiB of the image a plant already holds")
	fs.Float64Var(&c.Weights.Memory, "cost-memory", d.Weights.Memory, "bid cost times the fraction of a plant's guest memory in use")
}

// withDefaults fills in what a Config made by hand leaves zero. A zero
// Shortlist is the default here (the CLI turns its 0, every plant, into -1).
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	c.Logger = services.LoggerOr(c.Logger)
	if c.AuctionDeadline == 0 {
		c.AuctionDeadline = d.AuctionDeadline
	}
	if c.Weights == (market.Weights{}) {
		c.Weights = d.Weights
	}
	if c.Shortlist == 0 {
		c.Shortlist = d.Shortlist
	}
	if c.FailedTTL <= 0 {
		c.FailedTTL = d.FailedTTL
	}
	if c.SessionTTL <= 0 {
		c.SessionTTL = d.SessionTTL
	}
	return c
}
