package cli

import (
	"context"

	"github.com/spf13/cobra"

	"github.com/vmgrid/vmgrid/shop"
)

func shopCmd(g *globals) *cobra.Command {
	cfg := shop.DefaultRunConfig()
	c := serverCmd(g, &cobra.Command{
		Use:   "shop",
		Short: "Run a shop: CreateVM by auction among the plants, classads in etcd",
		Long: `Run a shop (VMPlants' VMShop). Clients ask it for VMs with a bearer token
(--tokens file: one "TOKEN NAME [ROLE]" per line). It matches the request's
configuration DAG against the golden images, holds an auction in etcd among
the plants registered there, asks the winner to create the VM and keeps the
classad in etcd. It keeps no state of its own: run as many as you like.

The auction's cost function is the shop's (--cost-*): plants price with the
weights each auction carries. With many plants the shop invites only the
--auction-shortlist plants whose registered offers cost least; they bid with
their live state, and if none of them can host the VM every plant is asked.`,
	}, &cfg.Server, func(ctx context.Context) error { return serve(ctx, shop.Start, cfg) })
	cfg.AddFlags(c.Flags())
	return c
}
