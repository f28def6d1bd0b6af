package testutil

import (
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"testing"
)

// Region is a byte range of a file that holds data.
type Region struct{ Off, Len uint64 }

// SparseFile creates a sparse file of size bytes at path with n regions of
// random, non-zero data of 1..maxLen bytes at random offsets (regions may
// overlap). Everything else is a hole. It returns the regions, sorted.
func SparseFile(tb testing.TB, path string, size uint64, n int, maxLen uint64, rng *rand.Rand) []Region {
	tb.Helper()
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(size)); err != nil {
		tb.Fatal(err)
	}
	regions := make([]Region, 0, n)
	for range n {
		l := 1 + rng.Uint64N(maxLen)
		off := rng.Uint64N(size - l + 1)
		data := make([]byte, l)
		RandomNonZero(rng, data)
		if _, err := f.WriteAt(data, int64(off)); err != nil {
			tb.Fatal(err)
		}
		regions = append(regions, Region{off, l})
	}
	sort.Slice(regions, func(i, j int) bool { return regions[i].Off < regions[j].Off })
	return regions
}

// RandomNonZero fills b with random bytes none of which is zero, so every
// byte written is data a zero map must not call zero.
func RandomNonZero(rng *rand.Rand, b []byte) {
	for i := 0; i < len(b); i += 8 {
		v := rng.Uint64()
		for j := i; j < min(i+8, len(b)); j++ {
			b[j] = byte(v) | 1
			v >>= 8
		}
	}
}

// RandomData fills b with uniformly random bytes (incompressible).
func RandomData(rng *rand.Rand, b []byte) {
	for i := 0; i < len(b); i += 8 {
		v := rng.Uint64()
		for j := i; j < min(i+8, len(b)); j++ {
			b[j] = byte(v)
			v >>= 8
		}
	}
}

var words = []string{
	"kernel", "page", "vmalloc", "inode", "dentry", "socket", "buffer", "slab",
	"task_struct", "mm_struct", "0xffff8880", "sched", "runqueue", "irq", "tcp",
	"ext4", "journal", "block", "device", "virtio", "net", "rx", "tx", "ring",
}

// MemoryLike returns n bytes that look like a guest's memory state: pages of
// random bytes (fraction random), pages of repetitive text and structures,
// and runs of zero pages (fraction zero). With random = 0.22 and zero = 0.05
// zstd's fastest level compresses it about 2.3x (1 MiB frames).
func MemoryLike(rng *rand.Rand, n int, random, zero float64) []byte {
	const page = 4096
	b := make([]byte, n)
	for off := 0; off < n; off += page {
		p := b[off:min(off+page, n)]
		switch x := rng.Float64(); {
		case x < zero:
			// left zero
		case x < zero+random:
			RandomData(rng, p)
		default:
			w := p[:0]
			for len(w) < len(p) {
				w = fmt.Appendf(w, "%s %s %08x %d\n", words[rng.IntN(len(words))], words[rng.IntN(len(words))], rng.Uint32N(64)<<12, rng.IntN(10))
			}
			copy(p, w)
		}
	}
	return b
}
