package cli

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/shop"
)

func etcdCmd(g *globals) *cobra.Command {
	cfg := shop.EtcdServerConfig{Dir: "/var/lib/vmgrid/etcd", ClientAddr: "127.0.0.1:2379", PeerAddr: "127.0.0.1:2380"}
	var root services.TLSFiles
	c := &cobra.Command{
		Use:   "etcd",
		Short: "Run etcd for a grid's shop and plants: one member, or a member of a cluster",
		Long: `Run a single-member etcd, the registry of a grid's shop and plants, as a
process of its own (the etcd vmgrid up embeds). With --tls-cert/--tls-key it
serves clients over TLS only, and with --tls-ca it requires client
certificates signed by that CA. --users turns on etcd's authentication:
each name is the CommonName of a client certificate (the shop's, each
plant's) allowed to read and write the grid's keys (/vmgrid/) and nothing
else; --root-cert/--root-key is the client certificate of etcd's "root"
user (CN root, signed by --tls-ca) that sets them up. vmgrid certs makes
all of these. It prints one line when it serves and stops on SIGINT or
SIGTERM.

A cluster (e.g. three hosts, or the compose grid): give each member its
--name and the same --initial-cluster NAME=PEER-URL,... (https:// peer URLs
with TLS: the members then speak TLS to each other with the same files),
listen on the host's addresses and --advertise-client/--advertise-peer
the HOST:PORT the others reach it at. Every member sets up --users (it
is idempotent).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck
			if len(cfg.Users) > 0 && (root.CertFile == "" || root.KeyFile == "") {
				return errors.New("--users needs --root-cert and --root-key (etcd's root user sets them up)")
			}
			root.CAFile = g.tls.CAFile
			cfg.TLS, cfg.Root, cfg.Logger = g.tls, root, log
			e, err := shop.StartEtcdServer(cfg)
			if err != nil {
				return err
			}
			defer e.Close()
			fmt.Fprintf(cmd.OutOrStdout(), "etcd is serving clients at %s (health: %s/health)\n", e.Endpoint, e.Endpoint)
			log.Info("etcd is serving", zap.String("endpoint", e.Endpoint), zap.Strings("users", cfg.Users))
			select {
			case <-cmd.Context().Done(): // Main's context ends on SIGINT and SIGTERM
				log.Info("etcd is stopping")
				return nil
			case err := <-e.Err():
				return fmt.Errorf("etcd stopped: %w", err)
			}
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.Dir, "data-dir", cfg.Dir, "directory of etcd's data")
	f.StringVar(&cfg.ClientAddr, "listen-client", cfg.ClientAddr, "HOST:PORT for clients (the shop, the plants)")
	f.StringVar(&cfg.PeerAddr, "listen-peer", cfg.PeerAddr, "HOST:PORT for peers (one member: keep it on loopback; a cluster: TLS with --tls-*)")
	f.StringSliceVar(&cfg.Users, "users", nil, "etcd users, the CNs of the shop's and plants' client certificates, comma separated (needs TLS with --tls-ca)")
	f.StringVar(&root.CertFile, "root-cert", "", "client certificate of etcd's root user (CN root), with --users")
	f.StringVar(&root.KeyFile, "root-key", "", "private key of --root-cert")
	f.StringVar(&cfg.Name, "name", "vmgrid", "this member's name (in --initial-cluster)")
	f.StringVar(&cfg.InitialCluster, "initial-cluster", "", "every member at the cluster's first start, NAME=PEER-URL,... (empty: this member alone)")
	f.StringVar(&cfg.AdvertiseClientAddr, "advertise-client", "", "HOST:PORT clients reach this member at (default: --listen-client)")
	f.StringVar(&cfg.AdvertisePeerAddr, "advertise-peer", "", "HOST:PORT the other members reach this member at (default: --listen-peer)")
	f.BoolVar(&cfg.NoFsync, "unsafe-no-fsync", false, "do not fsync (tests only: a crash loses data)")
	return c
}
