package blockcache

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// Run: go test -run '^$' -bench . ./computeserver/blockcache/
//
// The cache lives in b.TempDir() (the machine's disk); warm reads come from
// the page cache, as they do in production once a block has been read.

func benchCache(b *testing.B, bs int, noSync bool) *Cache {
	b.Helper()
	c := mustOpen(b, Config{Dir: b.TempDir(), Capacity: 256 << 20, Ways: 16, BlockSize: bs, UnsafeNoFsync: noSync})
	b.Cleanup(func() { c.Close() })
	return c
}

// fillWarm puts n blocks of "golden/disk" and returns their keys.
func fillWarm(b *testing.B, c *Cache, n int) []Key {
	b.Helper()
	keys := make([]Key, n)
	data := blockData("golden/disk", 0, 0, c.bs)
	for i := range keys {
		keys[i] = Key{File: "golden/disk", Block: uint64(i)}
		if err := c.Put(keys[i], data); err != nil {
			b.Fatal(err)
		}
	}
	return keys
}

func opsPerSec(b *testing.B) {
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

func BenchmarkGet(b *testing.B) {
	for _, bs := range []int{4 << 10, 64 << 10} {
		b.Run(fmt.Sprintf("%dKiB", bs>>10), func(b *testing.B) {
			c := benchCache(b, bs, true)
			keys := fillWarm(b, c, 1024)
			buf := make([]byte, bs)
			b.SetBytes(int64(bs))
			b.ResetTimer()
			for i := range b.N {
				if _, ok, err := c.Get(keys[i%len(keys)], buf); !ok || err != nil {
					b.Fatalf("Get: %v %v", ok, err)
				}
			}
			opsPerSec(b)
		})
	}
}

func BenchmarkGetParallel(b *testing.B) {
	for _, bs := range []int{4 << 10, 64 << 10} {
		b.Run(fmt.Sprintf("%dKiB", bs>>10), func(b *testing.B) {
			c := benchCache(b, bs, true)
			keys := fillWarm(b, c, 1024)
			b.SetBytes(int64(bs))
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, bs)
				r := rand.New(rand.NewPCG(rand.Uint64(), 0))
				for pb.Next() {
					if _, ok, err := c.Get(keys[r.IntN(len(keys))], buf); !ok || err != nil {
						b.Fatalf("Get: %v %v", ok, err)
					}
				}
			})
			opsPerSec(b)
		})
	}
}

// BenchmarkGetMiss is the cost of a miss: hash, set lock, scan of the ways.
func BenchmarkGetMiss(b *testing.B) {
	c := benchCache(b, 64<<10, true)
	fillWarm(b, c, 1024)
	buf := make([]byte, c.bs)
	b.ResetTimer()
	for i := range b.N {
		if _, ok, _ := c.Get(Key{File: "golden/other", Block: uint64(i)}, buf); ok {
			b.Fatal("hit")
		}
	}
	opsPerSec(b)
}

// BenchmarkPut fills new clean blocks; once the cache is full every Put
// also evicts.
func BenchmarkPut(b *testing.B) {
	for _, bs := range []int{4 << 10, 64 << 10} {
		b.Run(fmt.Sprintf("%dKiB", bs>>10), func(b *testing.B) {
			c := benchCache(b, bs, false)
			data := blockData("golden/disk", 0, 0, bs)
			b.SetBytes(int64(bs))
			b.ResetTimer()
			for i := range b.N {
				if err := c.Put(Key{File: "golden/disk", Block: uint64(i)}, data); err != nil {
					b.Fatal(err)
				}
			}
			opsPerSec(b)
		})
	}
}

// BenchmarkWrite stores dirty blocks: with fsync (the default: two
// fdatasyncs per Write) and without (UnsafeNoFsync) to show their cost.
// Blocks are rewritten in a round of 256, as a guest rewrites its disk.
func BenchmarkWrite(b *testing.B) {
	for _, bs := range []int{4 << 10, 64 << 10} {
		for _, noSync := range []bool{false, true} {
			name := fmt.Sprintf("%dKiB/fsync", bs>>10)
			if noSync {
				name = fmt.Sprintf("%dKiB/nofsync", bs>>10)
			}
			b.Run(name, func(b *testing.B) {
				c := benchCache(b, bs, noSync)
				data := blockData("vm/disk", 0, 0, bs)
				b.SetBytes(int64(bs))
				b.ResetTimer()
				for i := range b.N {
					if err := c.Write(Key{File: "vm/disk", Block: uint64(i % 256)}, data); err != nil {
						b.Fatal(err)
					}
				}
				opsPerSec(b)
			})
		}
	}
}

// BenchmarkWriteParallel shows group commit: concurrent Writes share
// fdatasyncs.
func BenchmarkWriteParallel(b *testing.B) {
	c := benchCache(b, 4<<10, false)
	data := blockData("vm/disk", 0, 0, c.bs)
	b.SetBytes(int64(c.bs))
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		r := rand.New(rand.NewPCG(rand.Uint64(), 0))
		for pb.Next() {
			if err := c.Write(Key{File: "vm/disk", Block: uint64(r.IntN(4096))}, data); err != nil {
				b.Fatal(err)
			}
		}
	})
	opsPerSec(b)
}

func BenchmarkHashFile(b *testing.B) {
	for range b.N {
		hashFile("images/debian-12-golden/disk.raw")
	}
}

// BenchmarkChecksum is the CRC-32C every Get pays to verify a frame.
func BenchmarkChecksum(b *testing.B) {
	data := blockData("f", 0, 0, 64<<10)
	b.SetBytes(int64(len(data)))
	for range b.N {
		checksum(data)
	}
}

// BenchmarkOpenWarm reopens an 8 GiB cache of 64 KiB blocks (16 ways):
// reading and checking 139264 tags.
func BenchmarkOpenWarm(b *testing.B) {
	cfg := Config{Dir: b.TempDir(), Capacity: 8 << 30, Ways: 16, BlockSize: 64 << 10}
	c := mustOpen(b, cfg)
	data := blockData("golden", 0, 0, 4096)
	for i := range 10000 {
		if err := c.Put(Key{File: "golden", Block: uint64(i)}, data); err != nil {
			b.Fatal(err)
		}
	}
	if err := c.Close(); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		c := mustOpen(b, cfg)
		if c.Stats().ValidBlocks != 10000 {
			b.Fatal("not warm")
		}
		c.Close()
	}
}
