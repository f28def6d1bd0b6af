package shop

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/url"
	"time"

	"go.etcd.io/etcd/api/v3/authpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
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

// EtcdServerConfig configures an embedded etcd.
type EtcdServerConfig struct {
	// Dir holds the data; ClientAddr and PeerAddr are host:port (port 0 is
	// not supported by etcd: pick free ports).
	Dir, ClientAddr, PeerAddr string
	// NoFsync trades durability for speed (tests).
	NoFsync bool
	// TLS, when its certificate is set, serves clients over https and, with
	// a CAFile, requires client certificates signed by it. Peers stay on
	// the loopback address without TLS (one member).
	TLS services.TLSFiles
	// Users, with TLS, turns on etcd's authentication: each name is an etcd
	// user (the CommonName of its client certificate, which etcd takes as
	// the user name) allowed to read and write the grid's keys
	// (KeyPrefix) and nothing else. Root is the client certificate of the
	// "root" user that sets this up; it must exist and be signed by the CA.
	Users []string
	Root  services.TLSFiles
	// Logger receives etcd's errors (nil: none).
	Logger *zap.Logger

	// A member of a cluster (vmgrid etcd --name/--initial-cluster; empty:
	// one member named "vmgrid"). Name is this member's; InitialCluster is
	// etcd's NAME=PEER-URL,… of every member at the cluster's first start
	// (with TLS the peers speak it too, with the same files, and the URLs
	// are https://). AdvertiseClientAddr and AdvertisePeerAddr are the
	// host:port others reach this member at (default: the listen
	// addresses; needed when those are 0.0.0.0).
	Name, InitialCluster                   string
	AdvertiseClientAddr, AdvertisePeerAddr string
}

// KeyPrefix is where every vmgrid key lives in etcd.
const KeyPrefix = "/vmgrid/"

// gridRole is the etcd role of the grid's services.
const gridRole = "vmgrid"

// StartEtcd starts an embedded etcd in dir listening for clients on
// clientAddr and for peers on peerAddr, without TLS or authentication.
func StartEtcd(dir, clientAddr, peerAddr string, noFsync bool, log *zap.Logger) (*EmbeddedEtcd, error) {
	return StartEtcdServer(EtcdServerConfig{Dir: dir, ClientAddr: clientAddr, PeerAddr: peerAddr, NoFsync: noFsync, Logger: log})
}

// StartEtcdServer starts an embedded etcd and, when c names Users, makes
// them and turns authentication on.
func StartEtcdServer(c EtcdServerConfig) (*EmbeddedEtcd, error) {
	secure := c.TLS.CertFile != ""
	cfg, advertised, err := memberConfig(c)
	if err != nil {
		return nil, err
	}
	if c.Logger != nil {
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(services.Quieter(c.Logger.Named("etcd"), zap.ErrorLevel))
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
	ee := &EmbeddedEtcd{e: e, Endpoint: advertised}
	if len(c.Users) > 0 {
		if !secure || c.TLS.CAFile == "" {
			e.Close()
			return nil, errors.New("embedded etcd: users need TLS with client certificates (a CA file)")
		}
		if err := ee.enableAuth(c); err != nil {
			e.Close()
			return nil, err
		}
	}
	return ee, nil
}

// memberConfig is etcd's configuration of c: its URLs, its cluster and
// TLS. advertised is the client URL others reach it at.
func memberConfig(c EtcdServerConfig) (cfg *embed.Config, advertised string, err error) {
	secure := c.TLS.CertFile != ""
	scheme, peerScheme := "http://", "http://"
	if secure {
		scheme = "https://"
		if c.InitialCluster != "" {
			peerScheme = "https://"
		}
	}
	cfg = embed.NewConfig()
	cfg.Dir = c.Dir
	cfg.Name = cmp.Or(c.Name, "vmgrid")
	urls := func(what, scheme, addr string) ([]url.URL, error) {
		u, err := url.Parse(scheme + addr)
		if err != nil {
			return nil, fmt.Errorf("etcd %s address: %w", what, err)
		}
		return []url.URL{*u}, nil
	}
	if cfg.ListenClientUrls, err = urls("client", scheme, c.ClientAddr); err != nil {
		return nil, "", err
	}
	if cfg.AdvertiseClientUrls, err = urls("advertised client", scheme, cmp.Or(c.AdvertiseClientAddr, c.ClientAddr)); err != nil {
		return nil, "", err
	}
	if cfg.ListenPeerUrls, err = urls("peer", peerScheme, c.PeerAddr); err != nil {
		return nil, "", err
	}
	if cfg.AdvertisePeerUrls, err = urls("advertised peer", peerScheme, cmp.Or(c.AdvertisePeerAddr, c.PeerAddr)); err != nil {
		return nil, "", err
	}
	cfg.InitialCluster = cmp.Or(c.InitialCluster, cfg.Name+"="+cfg.AdvertisePeerUrls[0].String())
	cfg.UnsafeNoFsync = c.NoFsync
	cfg.LogLevel = "error"
	if secure {
		cfg.ClientTLSInfo.CertFile, cfg.ClientTLSInfo.KeyFile = c.TLS.CertFile, c.TLS.KeyFile
		cfg.ClientTLSInfo.TrustedCAFile = c.TLS.CAFile
		cfg.ClientTLSInfo.ClientCertAuth = c.TLS.CAFile != ""
		if peerScheme == "https://" {
			cfg.PeerTLSInfo = cfg.ClientTLSInfo
		}
	}
	return cfg, cfg.AdvertiseClientUrls[0].String(), nil
}

// enableAuth makes the root user and the grid's users and turns
// authentication on. It is idempotent: a restarted grid (auth already on)
// only adds users that are new.
func (ee *EmbeddedEtcd) enableAuth(c EtcdServerConfig) error {
	tc, err := transport.TLSInfo{CertFile: c.Root.CertFile, KeyFile: c.Root.KeyFile, TrustedCAFile: c.Root.CAFile}.ClientConfig()
	if err != nil {
		return fmt.Errorf("etcd root client: %w", err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ee.Endpoint}, TLS: tc, DialTimeout: 5 * time.Second,
		Logger: services.Quieter(services.LoggerOr(c.Logger).Named("etcd-client"), zap.WarnLevel)})
	if err != nil {
		return fmt.Errorf("etcd root client: %w", err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := addUser(ctx, cli, "root", "root"); err != nil {
		return err
	}
	if _, err := cli.RoleAdd(ctx, gridRole); err != nil && !errors.Is(err, rpctypes.ErrRoleAlreadyExist) {
		return fmt.Errorf("etcd role %s: %w", gridRole, err)
	}
	end := clientv3.GetPrefixRangeEnd(KeyPrefix)
	if _, err := cli.RoleGrantPermission(ctx, gridRole, KeyPrefix, end, clientv3.PermissionType(authpb.READWRITE)); err != nil {
		return fmt.Errorf("etcd role %s: %w", gridRole, err)
	}
	for _, u := range c.Users {
		if err := addUser(ctx, cli, u, gridRole); err != nil {
			return err
		}
	}
	if _, err := cli.AuthEnable(ctx); err != nil {
		return fmt.Errorf("etcd auth enable: %w", err)
	}
	return nil
}

// addUser makes a password-less user (it authenticates with its client
// certificate) with role, if it does not exist yet.
func addUser(ctx context.Context, cli *clientv3.Client, name, role string) error {
	_, err := cli.UserAddWithOptions(ctx, name, "", &clientv3.UserAddOptions{NoPassword: true})
	if err != nil && !errors.Is(err, rpctypes.ErrUserAlreadyExist) {
		return fmt.Errorf("etcd user %s: %w", name, err)
	}
	if _, err := cli.UserGrantRole(ctx, name, role); err != nil {
		return fmt.Errorf("etcd user %s: role %s: %w", name, role, err)
	}
	return nil
}

// Close stops the server.
func (ee *EmbeddedEtcd) Close() { ee.e.Close() }

// Err reports a failure of the running server (it has stopped serving).
func (ee *EmbeddedEtcd) Err() <-chan error { return ee.e.Err() }
