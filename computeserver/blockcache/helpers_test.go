package blockcache

import (
	"bytes"
	"encoding/binary"
	"hash/fnv"
	"math/rand/v2"
	"os"
	"testing"
)

// smallConfig is a 64-set, 4-way cache of 4 KiB blocks (1 MiB).
func smallConfig(dir string) Config {
	return Config{Dir: dir, Capacity: 1 << 20, Ways: 4, BlockSize: 4 << 10}
}

func mustOpen(t testing.TB, cfg Config) *Cache {
	t.Helper()
	c, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return c
}

// crash abandons the cache the way a killed process does: the files are
// closed (releasing the lock) and nothing more is written.
func (c *Cache) crash() {
	c.closed.Store(true)
	c.closeFiles()
}

// frameOf returns the frame holding k, or -1.
func (c *Cache) frameOf(k Key) int {
	fh := hashFile(k.File)
	si := c.setIndex(fh, k.Block)
	c.sets[si].mu.Lock()
	defer c.sets[si].mu.Unlock()
	return c.find(si, fh, k.Block)
}

// sameSet returns n keys of file that all map to one set.
func (c *Cache) sameSet(file string, n int) []Key {
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = Key{File: file, Block: 3 + uint64(i)*c.geo.Sets}
	}
	return keys
}

// blockData is the content of version v of a block: a 24-byte header
// naming it, then bytes from a generator seeded by the header.
func blockData(file string, block, v uint64, n int) []byte {
	h := fnv.New64a()
	h.Write([]byte(file))
	fid := h.Sum64()
	b := make([]byte, n)
	var hdr [24]byte
	binary.LittleEndian.PutUint64(hdr[0:], fid)
	binary.LittleEndian.PutUint64(hdr[8:], block)
	binary.LittleEndian.PutUint64(hdr[16:], v)
	r := rand.New(rand.NewPCG(fid^block, v))
	for i := 0; i < n; i += 8 {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], r.Uint64())
		copy(b[i:], w[:])
	}
	copy(b, hdr[:])
	return b
}

// versionOf returns the version data claims to be, and whether data is
// exactly that version of (file, block).
func versionOf(file string, block uint64, data []byte) (uint64, bool) {
	if len(data) < 24 {
		return 0, false
	}
	v := binary.LittleEndian.Uint64(data[16:])
	return v, bytes.Equal(data, blockData(file, block, v, len(data)))
}

// flipByte corrupts one byte of a file at off.
func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [1]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5a
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// get reads k and fails the test on an error.
func get(t testing.TB, c *Cache, k Key) ([]byte, bool) {
	t.Helper()
	buf := make([]byte, c.BlockSize())
	n, ok, err := c.Get(k, buf)
	if err != nil {
		t.Fatalf("Get %v: %v", k, err)
	}
	return buf[:n], ok
}
