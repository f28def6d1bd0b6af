package blockcache

import (
	"fmt"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Block size limits. 4 KiB is a page (the unit the kernel and QEMU read);
// 1 MiB is the largest FUSE read and the imageserver's largest block.
const (
	MinBlockSize = 4 << 10
	MaxBlockSize = 1 << 20
	// MaxWays bounds the associativity: a lookup scans every way of a set.
	MaxWays = 64
	// defaultBankSize is the data a bank file holds when Config.Banks is 0.
	defaultBankSize = 1 << 30
)

// Config describes a cache. Capacity, Ways and BlockSize are its geometry:
// a cache on disk whose geometry differs from the Config is recreated.
type Config struct {
	// Dir holds the cache files; it is created if missing. One process at
	// a time may open it (Open takes an exclusive lock).
	Dir string
	// Capacity is the number of bytes of blocks the cache holds, rounded
	// down to a whole number of sets (Ways × BlockSize). Disk use is
	// (Ways+1)/Ways of it plus 64 bytes of tag per frame: every set has one
	// spare frame so that a dirty block is never overwritten in place.
	Capacity int64
	// Ways is the associativity: the number of blocks one set holds, 1..64.
	Ways int
	// BlockSize is the size of a frame, a power of two from 4 KiB to 1 MiB.
	BlockSize int
	// Banks is the number of bank files the frames are spread over; 0
	// picks one per GiB of capacity.
	Banks int
	// UnsafeNoFsync makes Write and MarkClean return before their data and
	// tags reach stable storage. Dirty data then survives a crash of the
	// process (kill -9) but not of the machine. For tests and benchmarks.
	UnsafeNoFsync bool
	// Logger receives open/recreate/close and corruption reports; nil
	// means no logging.
	Logger *zap.Logger
}

// DefaultConfig is the geometry a compute server's cache has unless told
// otherwise (the defaults of `--cache-size`, `--cache-ways` and
// `--cache-block-size`): 4 GiB in sets of 8 frames of 64 KiB.
func DefaultConfig() Config {
	return Config{Capacity: 4 << 30, Ways: 8, BlockSize: 64 << 10}
}

// geometry is what a cache on disk must match to be reopened warm. It is
// stored as JSON in the meta file.
type geometry struct {
	Format      string `json:"format"`
	BlockSize   int    `json:"block_size"`
	Ways        int    `json:"ways"`
	Sets        uint64 `json:"sets"`
	Banks       int    `json:"banks"`
	SetsPerBank uint64 `json:"sets_per_bank"`
}

const formatName = "vmgrid-blockcache/1"

func invalidf(format string, args ...any) error {
	return fmt.Errorf("blockcache: "+format+": %w", append(args, errdefs.ErrInvalidArgument)...)
}

func (cfg *Config) geometry() (geometry, error) {
	switch {
	case cfg.Dir == "":
		return geometry{}, invalidf("no Dir")
	case cfg.BlockSize < MinBlockSize || cfg.BlockSize > MaxBlockSize || cfg.BlockSize&(cfg.BlockSize-1) != 0:
		return geometry{}, invalidf("BlockSize %d is not a power of two in [%d, %d]", cfg.BlockSize, MinBlockSize, MaxBlockSize)
	case cfg.Ways < 1 || cfg.Ways > MaxWays:
		return geometry{}, invalidf("Ways %d is not in [1, %d]", cfg.Ways, MaxWays)
	case cfg.Banks < 0:
		return geometry{}, invalidf("Banks %d is negative", cfg.Banks)
	}
	setBytes := int64(cfg.Ways) * int64(cfg.BlockSize)
	if cfg.Capacity < setBytes {
		return geometry{}, invalidf("Capacity %d is less than one set (%d ways × %d bytes)", cfg.Capacity, cfg.Ways, cfg.BlockSize)
	}
	sets := uint64(cfg.Capacity / setBytes)
	banks := uint64(cfg.Banks)
	if banks == 0 {
		banks = (sets*uint64(setBytes) + defaultBankSize - 1) / defaultBankSize
	}
	if banks > sets {
		if cfg.Banks != 0 {
			return geometry{}, invalidf("Banks %d is more than the %d sets", cfg.Banks, sets)
		}
		banks = sets
	}
	perBank := (sets + banks - 1) / banks
	return geometry{
		Format:      formatName,
		BlockSize:   cfg.BlockSize,
		Ways:        cfg.Ways,
		Sets:        sets,
		Banks:       int((sets + perBank - 1) / perBank),
		SetsPerBank: perBank,
	}, nil
}

func (g geometry) String() string {
	return fmt.Sprintf("%d sets × %d ways × %d B in %d banks", g.Sets, g.Ways, g.BlockSize, g.Banks)
}

func (g geometry) stride() uint64 { return uint64(g.Ways) + 1 }
func (g geometry) frames() uint64 { return g.Sets * g.stride() }

// bankSets is the number of sets in bank b (the last bank may be short).
func (g geometry) bankSets(b int) uint64 {
	first := uint64(b) * g.SetsPerBank
	return min(g.SetsPerBank, g.Sets-first)
}
