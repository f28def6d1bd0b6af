package shop

import (
	"fmt"
	"net/url"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/services"
)

// EmbeddedEtcd is an etcd server running inside this process (the
// single-machine default of `vmgrid up`).
type EmbeddedEtcd struct {
	e        *embed.Etcd
	Endpoint string
}

// StartEtcd starts an embedded etcd in dir listening for clients on
// clientAddr and for peers on peerAddr (host:port; port 0 is not supported
// by etcd, pick free ports). noFsync trades durability for speed (tests).
func StartEtcd(dir, clientAddr, peerAddr string, noFsync bool, log *zap.Logger) (*EmbeddedEtcd, error) {
	cfg := embed.NewConfig()
	cfg.Dir = dir
	cfg.Name = "vmgrid"
	cu, _ := url.Parse("http://" + clientAddr)
	pu, _ := url.Parse("http://" + peerAddr)
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	cfg.UnsafeNoFsync = noFsync
	cfg.LogLevel = "error"
	if log != nil {
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(services.Quieter(log.Named("etcd"), zap.ErrorLevel))
	}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("embedded etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		return nil, fmt.Errorf("embedded etcd did not become ready in 30s")
	}
	return &EmbeddedEtcd{e: e, Endpoint: cu.String()}, nil
}

// Close stops the server.
func (e *EmbeddedEtcd) Close() { e.e.Close() }
