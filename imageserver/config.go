package imageserver

import (
	"fmt"

	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// StoreConfig is where the warehouse keeps its images and how it publishes
// them: the part of `vmgrid imageserver`'s settings this package owns (the
// role's Config adds the server's).
type StoreConfig struct {
	DataDir string
	// BlockSize is the block size of published files whose publisher does
	// not choose one (0: blockproto.DefaultBlockSize).
	BlockSize uint32
	Logger    *zap.Logger
}

// DefaultStoreConfig is the one place the store's defaults are written.
func DefaultStoreConfig() StoreConfig {
	return StoreConfig{DataDir: "/var/lib/vmgrid/images", BlockSize: blockproto.DefaultBlockSize}
}

// AddFlags registers the store's flags (--data-dir, --block-size) with c's
// values (DefaultStoreConfig's, usually) as defaults.
func (c *StoreConfig) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "directory holding the images")
	fs.Uint32Var(&c.BlockSize, "block-size", c.BlockSize, "default block size of published files in bytes, a power of two from 4096 to 1048576")
}

// Open opens the store c describes (see OpenStore).
func (c StoreConfig) Open() (*Store, error) {
	bs := c.BlockSize
	if bs == 0 {
		bs = blockproto.DefaultBlockSize
	}
	if bs < blockproto.MinBlockSize || bs > blockproto.MaxBlockSize || bs&(bs-1) != 0 {
		return nil, fmt.Errorf("block size %d: want a power of two from %d to %d: %w", bs, blockproto.MinBlockSize, blockproto.MaxBlockSize, errdefs.ErrInvalidArgument)
	}
	s, err := OpenStore(c.DataDir, c.Logger)
	if err != nil {
		return nil, err
	}
	s.defaultBlockSize = bs
	return s, nil
}
