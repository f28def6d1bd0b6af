package computeserver

import (
	"context"
	"fmt"
	"net"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vnet"
	"github.com/vmgrid/vmgrid/shop/market"
)

// openNetwork opens the plant's network manager. The underlay defaults to
// the host of the listen address; a plant whose default underlay cannot
// carry VXLAN runs without networks (requests with one are refused), one
// whose --underlay-addr was given fails to start.
func openNetwork(cfg Config, name string, log *zap.Logger) (*vnet.Manager, error) {
	nc := cfg.Network
	explicit := nc.Underlay != ""
	if !explicit {
		host, _, err := net.SplitHostPort(cfg.Server.Listen)
		if err != nil || net.ParseIP(host) == nil || net.ParseIP(host).IsUnspecified() {
			log.Info("no guest networks: the listen address names no underlay address (--underlay-addr)", zap.String("listen", cfg.Server.Listen))
			return nil, nil
		}
		nc.Underlay = host
	}
	if nc.Prefix == "" {
		// Name and data directory: two grids on one host (vmgrid up, test
		// grids) both have a "plant0", and a plant's start-up reconcile
		// removes the devices of its prefix that it does not use.
		nc.Prefix = NetworkPrefix(name, cfg.DataDir)
	}
	m, err := vnet.New(nc, log)
	if err != nil && explicit {
		return nil, err
	}
	if err != nil {
		log.Warn("no guest networks", zap.Error(err))
		return nil, nil
	}
	return m, nil
}

// NetworkPrefix is the device prefix of a plant named name with its data
// in dataDir (vnet.Config.Prefix, when --netns gives none of its own).
func NetworkPrefix(name, dataDir string) string { return vnet.PrefixFor(name + "\x00" + dataDir) }

// followPeers keeps every segment of the plant flooding to the other
// plants that have a segment of the same VNI, as the registry (an etcd
// watch) shows them, until ctx ends.
func followPeers(ctx context.Context, cli *clientv3.Client, m *vnet.Manager, log *zap.Logger) (<-chan struct{}, error) {
	reg, err := market.WatchRegistry(ctx, cli, log)
	if err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer reg.Close()
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			syncPeers(m, reg.Plants(), log)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return done, nil
}

// syncPeers sets the flood list of each of m's segments from plants.
func syncPeers(m *vnet.Manager, plants []market.PlantInfo, log *zap.Logger) {
	for _, vni := range m.VNIs() {
		var peers []string
		for _, p := range plants {
			if p.Underlay != "" && slices.Contains(p.VNIs, vni) {
				peers = append(peers, p.Underlay)
			}
		}
		if err := m.SetPeers(vni, peers); err != nil {
			log.Warn("VXLAN peers", zap.Uint32("vni", vni), zap.Error(err))
		}
	}
}

// networkInfo adds the plant's underlay and segments to its offer.
func networkInfo(pi *market.PlantInfo, pl *plant.Plant) {
	if m := pl.Network(); m != nil {
		pi.Underlay, pi.VNIs = m.Endpoint(), m.VNIs()
	}
}

// withNetwork is info with the plant's network added.
func withNetwork(info func() market.PlantInfo, pl *plant.Plant) func() market.PlantInfo {
	return func() market.PlantInfo {
		pi := info()
		networkInfo(&pi, pl)
		return pi
	}
}
