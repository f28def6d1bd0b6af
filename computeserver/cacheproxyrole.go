package computeserver

import (
	"context"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/imageserver"
	"github.com/vmgrid/vmgrid/services"
)

// CacheProxyServer is a running cache proxy in the shape every role has
// (Addr, Serve, Close).
type CacheProxyServer struct {
	*services.Role
	Proxy *gvfs.Proxy
}

// StartCacheProxyServer opens the caches and starts listening; serve with
// Serve, stop with Close. The proxy forwards write-back, so it reads
// messages as large as the image server does.
func StartCacheProxyServer(_ context.Context, cfg CacheProxyConfig) (*CacheProxyServer, error) {
	if cfg.Server.MaxRecvMsgSize == 0 {
		cfg.Server.MaxRecvMsgSize = imageserver.WriteBlocksMaxMsg
	}
	cp, err := StartCacheProxy(cfg) // it undoes its own half start
	if err != nil {
		return nil, err
	}
	var undo services.Undo
	undo.Push(cp.Close)
	return &CacheProxyServer{Role: services.NewRole(cp.Server, &undo), Proxy: cp.Proxy}, nil
}
