package services

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/pflag"
)

// SizeVar registers a byte-size flag that accepts 4GiB, 64KiB, 512MiB or a
// number of bytes; *p's value is the default.
func SizeVar[T ~int | ~int64 | ~uint64](fs *pflag.FlagSet, p *T, name, usage string) {
	fs.Var(sizeValue[T]{p}, name, usage)
}

type sizeValue[T ~int | ~int64 | ~uint64] struct{ p *T }

func (s sizeValue[T]) String() string { return HumanBytes(uint64(*s.p)) }
func (s sizeValue[T]) Type() string   { return "size" }
func (s sizeValue[T]) Set(v string) error {
	n, err := ParseSize(v)
	if err != nil {
		return err
	}
	*s.p = T(n)
	return nil
}

// ParseSize parses a byte size with an optional binary unit.
func ParseSize(v string) (int64, error) {
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

// HumanBytes prints n with a binary unit: 512B, 64.0KiB, 4.0GiB.
func HumanBytes(n uint64) string {
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
