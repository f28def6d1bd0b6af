package blockproto

import "testing"

func TestZeroMapHelpers(t *testing.T) {
	for _, c := range []struct {
		size uint64
		want int
	}{{0, 0}, {1, 1}, {4096, 1}, {4097, 1}, {8 * 4096, 1}, {8*4096 + 1, 2}, {1 << 30, 1 << 15}} {
		if got := ZeroMapLen(c.size); got != c.want {
			t.Errorf("ZeroMapLen(%d) = %d, want %d", c.size, got, c.want)
		}
	}
	zm := []byte{0b0000_0110, 0xff} // granules 1, 2 and 8..15 are zero
	for _, c := range []struct {
		off, n uint64
		want   bool
	}{
		{0, 0, true},
		{0, 1, false},
		{4096, 4096, true},
		{4096, 8192, true},
		{4096, 8193, false}, // reaches granule 3
		{4095, 2, false},    // touches granule 0
		{8 * 4096, 8 * 4096, true},
		{8 * 4096, 8*4096 + 1, false}, // past the map
		{100 * 4096, 1, false},
	} {
		if got := IsZeroRange(zm, c.off, c.n); got != c.want {
			t.Errorf("IsZeroRange(%d, %d) = %v, want %v", c.off, c.n, got, c.want)
		}
	}
	for n := range 40 {
		b := make([]byte, n)
		if !IsZero(b) {
			t.Fatalf("IsZero(%d zero bytes) = false", n)
		}
		for i := range n {
			b[i] = 1
			if IsZero(b) {
				t.Fatalf("IsZero with byte %d of %d set = true", i, n)
			}
			b[i] = 0
		}
	}
}
