package services

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// EtcdConfig is how every vmgrid process reaches etcd: the shop (its
// registry, classads and auctions) and the plants (registration, bids).
type EtcdConfig struct {
	Endpoints []string
	// TLS: CAFile to trust the etcd server, CertFile/KeyFile to present a
	// client certificate.
	TLS TLSFiles
	// Username and PasswordFile turn on etcd's authentication (the password
	// is read from a file so it shows neither in ps nor in --help).
	Username     string
	PasswordFile string
	DialTimeout  time.Duration
}

// DefaultEtcdConfig is a local etcd without TLS or authentication.
func DefaultEtcdConfig() EtcdConfig {
	return EtcdConfig{Endpoints: []string{"http://127.0.0.1:2379"}, DialTimeout: 5 * time.Second}
}

// AddFlags registers --etcd and the --etcd-* TLS and authentication flags
// with c's values as defaults.
func (c *EtcdConfig) AddFlags(fs *pflag.FlagSet, usage string) {
	fs.StringSliceVar(&c.Endpoints, "etcd", c.Endpoints, usage)
	fs.StringVar(&c.TLS.CAFile, "etcd-cacert", c.TLS.CAFile, "PEM CA bundle to trust the etcd server with")
	fs.StringVar(&c.TLS.CertFile, "etcd-cert", c.TLS.CertFile, "PEM client certificate to present to etcd")
	fs.StringVar(&c.TLS.KeyFile, "etcd-key", c.TLS.KeyFile, "PEM private key of --etcd-cert")
	fs.StringVar(&c.Username, "etcd-user", c.Username, "etcd user name (with --etcd-password-file)")
	fs.StringVar(&c.PasswordFile, "etcd-password-file", c.PasswordFile, "file holding the password of --etcd-user")
}

// New connects to etcd; log (nil: none) receives the client's warnings.
func (c EtcdConfig) New(log *zap.Logger) (*clientv3.Client, error) {
	cfg := clientv3.Config{
		Endpoints:   c.Endpoints,
		DialTimeout: c.DialTimeout,
		Username:    c.Username,
		Logger:      Quieter(LoggerOr(log).Named("etcd-client"), zap.WarnLevel),
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if c.PasswordFile != "" {
		b, err := os.ReadFile(c.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("etcd password: %w", err)
		}
		cfg.Password = strings.TrimRight(string(b), "\r\n")
	}
	if c.TLS.Enabled() {
		t, err := c.TLS.clientConfig()
		if err != nil {
			return nil, fmt.Errorf("etcd: %w", err)
		}
		cfg.TLS = t
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcd %v: %w", c.Endpoints, err)
	}
	return cli, nil
}
