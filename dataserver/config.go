package dataserver

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/pflag"
	"go.uber.org/zap"
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
// the defaults of DefaultStoreConfig.
func (c *StoreConfig) AddFlags(fs *pflag.FlagSet) {
	d := DefaultStoreConfig()
	fs.StringVar(&c.DataDir, "data-dir", d.DataDir, "directory holding the files")
	c.MaxFileSize = d.MaxFileSize
	fs.Var((*byteSize)(&c.MaxFileSize), "max-file-size", "largest file accepted, e.g. 100GiB (0: no limit but the disk)")
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

// byteSize is a size flag: bytes, or a number with a binary unit.
type byteSize uint64

var sizeUnits = map[string]uint64{"": 1, "B": 1, "K": 1 << 10, "KiB": 1 << 10, "M": 1 << 20, "MiB": 1 << 20, "G": 1 << 30, "GiB": 1 << 30, "T": 1 << 40, "TiB": 1 << 40}

func (b *byteSize) Set(v string) error {
	s := strings.TrimSpace(v)
	i := strings.IndexFunc(s, func(r rune) bool { return r < '0' || r > '9' })
	if i < 0 {
		i = len(s)
	}
	n, err := strconv.ParseUint(s[:i], 10, 64)
	mult, ok := sizeUnits[strings.TrimSpace(s[i:])]
	if err != nil || !ok {
		return fmt.Errorf("size %q: want a number of bytes with an optional unit (KiB, MiB, GiB, TiB)", v)
	}
	*b = byteSize(n * mult)
	return nil
}

func (b *byteSize) String() string { return strconv.FormatUint(uint64(*b), 10) }
func (b *byteSize) Type() string   { return "size" }
