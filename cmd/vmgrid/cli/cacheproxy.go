package cli

import (
	"context"

	"github.com/spf13/cobra"

	"github.com/vmgrid/vmgrid/computeserver"
)

func cacheproxyCmd(g *globals) *cobra.Command {
	cfg := computeserver.DefaultCacheProxyConfig()
	c := serverCmd(g, &cobra.Command{
		Use:   "cacheproxy",
		Short: "Run a cache proxy: the image read API served from a local cache (a second-level LAN cache)",
		Long: `Run a cache proxy in front of an image server (or another proxy). It serves
the same ImageService API: block and whole-file reads come from its disk
block cache and file cache, misses are fetched from --upstream once, and
everything else (publish, write-back, delete) is forwarded. Compute
servers in one LAN point --upstream at a shared proxy to share its warm
cache in front of a distant image server; proxies can be chained.`,
	}, &cfg.Server, func(ctx context.Context) error {
		cfg.UpstreamTLS = g.tls
		return serve(ctx, computeserver.StartCacheProxy, cfg)
	})
	cfg.AddFlags(c.Flags())
	return c
}
