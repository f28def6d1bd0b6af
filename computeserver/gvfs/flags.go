package gvfs

import (
	"fmt"
	"strconv"
	"strings"
)

// sizeFlag is a byte-size flag that accepts 4GiB, 64KiB, 512MiB or bytes,
// and prints sizes the way the CLI always has (4.0GiB).
type sizeFlag[T int | int64] struct{ n *T }

func (s sizeFlag[T]) String() string { return humanBytes(uint64(*s.n)) }
func (s sizeFlag[T]) Type() string   { return "size" }
func (s sizeFlag[T]) Set(v string) error {
	n, err := parseSize(v)
	if err == nil {
		*s.n = T(n)
	}
	return err
}

func parseSize(v string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1}}
	s := strings.TrimSpace(v)
	mult := int64(1)
	for _, u := range units {
		if rest, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = strings.TrimSpace(rest), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("size %q: want a number of bytes with an optional unit (KiB, MiB, GiB, TiB)", v)
	}
	return n * mult, nil
}

func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
