package dataserver

import (
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/services"
)

// StoreConfig is where the data repository keeps its files and how large
// one may be: the part of `vmgrid dataserver`'s settings this package owns
// (the role's Config adds the server's and the tokens).
type StoreConfig struct {
	DataDir string
	// MaxFileSize bounds one file (0: no limit but the disk).
	MaxFileSize uint64
	Logger      *zap.Logger
}

// DefaultStoreConfig is the one place the store's defaults are written.
func DefaultStoreConfig() StoreConfig {
	return StoreConfig{DataDir: "/var/lib/vmgrid/data"}
}

// AddFlags registers the store's flags (--data-dir, --max-file-size) with
// c's values (DefaultStoreConfig's, usually) as defaults.
func (c *StoreConfig) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "directory holding the files")
	services.SizeVar(fs, &c.MaxFileSize, "max-file-size", "largest file accepted, e.g. 100GiB (0: no limit but the disk)")
}

// Open opens the store c describes (see OpenStore).
func (c StoreConfig) Open() (*Store, error) {
	s, err := OpenStore(c.DataDir, c.Logger)
	if err != nil {
		return nil, err
	}
	s.MaxFileSize = c.MaxFileSize
	return s, nil
}
