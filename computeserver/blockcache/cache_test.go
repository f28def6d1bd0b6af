package blockcache

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

func TestRoundTripManyFiles(t *testing.T) {
	// 2048 sets × 8 ways: 1000 blocks in runs of 50 fit without eviction.
	c := mustOpen(t, Config{Dir: t.TempDir(), Capacity: 64 << 20, Ways: 8, BlockSize: 4 << 10})
	defer c.Close()
	r := rand.New(rand.NewPCG(1, 2))
	want := map[Key][]byte{}
	for f := range 20 {
		file := fmt.Sprintf("image-%d/disk.raw", f)
		for b := range uint64(50) {
			n := c.BlockSize()
			if b == 49 {
				n = 1 + r.IntN(c.BlockSize()) // a file's short last block
			}
			data := make([]byte, n)
			for i := range data {
				data[i] = byte(r.Uint32())
			}
			k := Key{File: file, Block: b}
			if err := c.Put(k, data); err != nil {
				t.Fatalf("Put %v: %v", k, err)
			}
			want[k] = data
		}
	}
	if ev := c.Stats().Evictions; ev != 0 {
		t.Fatalf("%d evictions; the test wants none", ev)
	}
	for k, data := range want {
		got, ok := get(t, c, k)
		if !ok || !bytes.Equal(got, data) {
			t.Fatalf("Get %v: ok=%v, %d bytes equal=%v", k, ok, len(got), bytes.Equal(got, data))
		}
	}
	if _, ok := get(t, c, Key{File: "image-0/disk.raw", Block: 50}); ok {
		t.Fatal("hit on a block never stored")
	}
	if _, ok := get(t, c, Key{File: "image-0/disk.raw2", Block: 1}); ok {
		t.Fatal("hit on another file's block")
	}
	st := c.Stats()
	if st.Hits != 1000 || st.Misses != 2 || st.Fills != 1000 || st.ValidBlocks != 1000 {
		t.Fatalf("stats %+v", st)
	}
	if got, want := st.Capacity, int64(64<<20); got != want {
		t.Fatalf("capacity %d, want %d", got, want)
	}
}

func TestConsecutiveBlocksConsecutiveSets(t *testing.T) {
	c := mustOpen(t, smallConfig(t.TempDir()))
	defer c.Close()
	for _, file := range []string{"a", "golden/disk.raw", "sha256:0123abcd"} {
		fh := hashFile(file)
		first := c.setIndex(fh, 0)
		for b := range uint64(3 * c.geo.Sets) {
			if got, want := c.setIndex(fh, b), (first+b)%c.geo.Sets; got != want {
				t.Fatalf("%s block %d: set %d, want %d", file, b, got, want)
			}
			k := Key{File: file, Block: b}
			if b < c.geo.Sets { // the first round fits: one block per set
				must(t, c.Put(k, []byte{byte(b)}))
				if fi := c.frameOf(k); uint64(fi)/c.stride != (first+b)%c.geo.Sets {
					t.Fatalf("%s block %d stored in frame %d, outside set %d", file, b, fi, (first+b)%c.geo.Sets)
				}
			}
		}
	}
	// Consecutive sets are neighbours in a bank file.
	_, off0 := c.frameLoc(0)
	_, off1 := c.frameLoc(int(c.stride))
	if off1-off0 != int64(c.stride)*int64(c.bs) {
		t.Fatalf("set 1 starts %d bytes after set 0", off1-off0)
	}
}

func TestLRUWithinSet(t *testing.T) {
	c := mustOpen(t, smallConfig(t.TempDir()))
	defer c.Close()
	k := c.sameSet("f", 6)
	for _, key := range k[:4] {
		must(t, c.Put(key, []byte(key.File)))
	}
	// Use 0 and 2: the LRU order becomes 1, 3, 0, 2.
	get(t, c, k[0])
	get(t, c, k[2])
	for i, evicted := range []int{1, 3} {
		must(t, c.Put(k[4+i], []byte("new")))
		if c.Has(k[evicted]) {
			t.Fatalf("after filling %v, block %v (least recently used) is still cached", k[4+i], k[evicted])
		}
	}
	for _, i := range []int{0, 2, 4, 5} {
		if !c.Has(k[i]) {
			t.Fatalf("%v was evicted", k[i])
		}
	}
	if st := c.Stats(); st.Evictions != 2 || st.ValidBlocks != 4 {
		t.Fatalf("stats %+v", st)
	}
	// Put of a cached block only refreshes it: 0 is now the newest.
	must(t, c.Put(k[0], []byte("ignored")))
	must(t, c.Put(k[1], []byte("again")))
	if c.Has(k[2]) || !c.Has(k[0]) {
		t.Fatal("Put of a cached block did not count as a use")
	}
	if got, _ := get(t, c, k[0]); string(got) != k[0].File {
		t.Fatalf("Put replaced a cached block: %q", got)
	}
}

func TestDirtyNeverEvicted(t *testing.T) {
	c := mustOpen(t, smallConfig(t.TempDir()))
	defer c.Close()
	k := c.sameSet("disk", 6)
	for i, key := range k[:4] {
		must(t, c.Write(key, blockData(key.File, key.Block, 1, 100+i)))
	}
	err := c.Put(k[4], []byte("clean"))
	if !errors.Is(err, ErrSetFull) || !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("Put into a set of dirty blocks: %v, want ErrSetFull", err)
	}
	if err := c.Write(k[4], []byte("dirty")); !errors.Is(err, ErrSetFull) {
		t.Fatalf("Write into a set of dirty blocks: %v, want ErrSetFull", err)
	}
	if c.Has(k[4]) {
		t.Fatal("a refused block is cached")
	}
	// New versions of the dirty blocks still fit (the spare frame).
	for round := uint64(2); round < 5; round++ {
		for _, key := range k[:4] {
			if err := c.Write(key, blockData(key.File, key.Block, round, c.bs)); err != nil {
				t.Fatalf("rewrite %v: %v", key, err)
			}
		}
	}
	for _, key := range k[:4] {
		got, ok := get(t, c, key)
		if v, good := versionOf(key.File, key.Block, got); !ok || !good || v != 4 {
			t.Fatalf("%v: ok=%v version %d intact=%v", key, ok, v, good)
		}
	}
	if got := c.Dirty("disk"); len(got) != 4 {
		t.Fatalf("Dirty = %v", got)
	}
	// Once one is clean, it is the one to go.
	buf := make([]byte, c.bs)
	_, seq, err := c.ReadDirty(k[1], buf)
	if err != nil {
		t.Fatal(err)
	}
	must(t, c.MarkClean(k[1], seq))
	if err := c.Put(k[4], []byte("clean")); err != nil {
		t.Fatalf("Put after a clean: %v", err)
	}
	if c.Has(k[1]) || !c.Has(k[4]) {
		t.Fatal("the clean block was not the one evicted")
	}
	want := []uint64{k[0].Block, k[2].Block, k[3].Block}
	if got := c.Dirty("disk"); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("Dirty = %v, want %v", got, want)
	}
	if st := c.Stats(); st.SetFull != 2 || st.DirtyBlocks != 3 || st.DirtyBytes != int64(3*c.bs) {
		t.Fatalf("stats %+v", st)
	}
}

func TestMarkCleanStale(t *testing.T) {
	c := mustOpen(t, smallConfig(t.TempDir()))
	defer c.Close()
	k := Key{File: "redo.log", Block: 7}
	buf := make([]byte, c.bs)
	if _, _, err := c.ReadDirty(k, buf); !errdefs.IsNotFound(err) {
		t.Fatalf("ReadDirty of an absent block: %v", err)
	}
	if err := c.MarkClean(k, 1); !errdefs.IsNotFound(err) {
		t.Fatalf("MarkClean of an absent block: %v", err)
	}
	must(t, c.Write(k, []byte("v1")))
	n, seq1, err := c.ReadDirty(k, buf) // the flusher reads v1 ...
	if err != nil || string(buf[:n]) != "v1" {
		t.Fatalf("ReadDirty: %q, %v", buf[:n], err)
	}
	if err := c.Write(k, []byte("v2")); err != nil { // ... a write races with it ...
		t.Fatal(err)
	}
	err = c.MarkClean(k, seq1) // ... and v1's flush must not clean v2.
	if !errors.Is(err, ErrStale) || !errors.Is(err, errdefs.ErrAborted) {
		t.Fatalf("MarkClean with a stale seq: %v", err)
	}
	if got := c.Dirty(k.File); len(got) != 1 || got[0] != 7 {
		t.Fatalf("Dirty = %v after a stale MarkClean", got)
	}
	n, seq2, err := c.ReadDirty(k, buf)
	if err != nil || string(buf[:n]) != "v2" || seq2 <= seq1 {
		t.Fatalf("ReadDirty: %q seq %d (was %d), %v", buf[:n], seq2, seq1, err)
	}
	must(t, c.MarkClean(k, seq2))
	if err := c.MarkClean(k, seq2); err != nil {
		t.Fatalf("second MarkClean: %v", err)
	}
	if got := c.DirtyFiles(); len(got) != 0 {
		t.Fatalf("DirtyFiles = %v", got)
	}
	if got, ok := get(t, c, k); !ok || string(got) != "v2" {
		t.Fatalf("clean block: %q %v", got, ok)
	}
	if _, _, err := c.ReadDirty(k, buf); !errdefs.IsNotFound(err) {
		t.Fatalf("ReadDirty of a clean block: %v", err)
	}
	if st := c.Stats(); st.StaleCleans != 1 || st.Cleaned != 1 || st.Writes != 2 {
		t.Fatalf("stats %+v", st)
	}
}

func TestPutKeepsDirtyData(t *testing.T) {
	c := mustOpen(t, smallConfig(t.TempDir()))
	defer c.Close()
	k := Key{File: "disk", Block: 1}
	must(t, c.Write(k, []byte("mine")))
	must(t, c.Put(k, []byte("upstream")))
	if got, ok := get(t, c, k); !ok || string(got) != "mine" {
		t.Fatalf("Get = %q, %v", got, ok)
	}
	must(t, c.Write(k, []byte("mine2")))
	if got, _ := get(t, c, k); string(got) != "mine2" {
		t.Fatalf("Get = %q", got)
	}
	if st := c.Stats(); st.ValidBlocks != 1 || st.DirtyBlocks != 1 || st.DirtyBytes != 5 {
		t.Fatalf("stats %+v", st)
	}
}

func TestPutVerified(t *testing.T) {
	c := mustOpen(t, smallConfig(t.TempDir()))
	defer c.Close()
	k := Key{File: "golden", Block: 0}
	data := blockData("golden", 0, 0, c.bs)
	bad := sha256.Sum256([]byte("something else"))
	err := c.PutVerified(k, data, bad[:])
	if !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("PutVerified with a wrong digest: %v", err)
	}
	if c.Has(k) {
		t.Fatal("PutVerified stored a block whose digest did not match")
	}
	good := sha256.Sum256(data)
	must(t, c.PutVerified(k, data, good[:]))
	if got, ok := get(t, c, k); !ok || !bytes.Equal(got, data) {
		t.Fatal("verified block did not round-trip")
	}
}

func TestInvalidateAndDrop(t *testing.T) {
	c := mustOpen(t, smallConfig(t.TempDir()))
	defer c.Close()
	for b := range uint64(10) {
		must(t, c.Put(Key{File: "a", Block: b}, []byte("a")))
		must(t, c.Put(Key{File: "b", Block: b}, []byte("b")))
	}
	must(t, c.Write(Key{File: "a", Block: 3}, []byte("dirty")))
	n, err := c.Invalidate("a")
	if err != nil || n != 9 {
		t.Fatalf("Invalidate = %d, %v; want 9", n, err)
	}
	if got, ok := get(t, c, Key{File: "a", Block: 3}); !ok || string(got) != "dirty" {
		t.Fatal("Invalidate dropped a dirty block")
	}
	if c.Has(Key{File: "a", Block: 4}) || !c.Has(Key{File: "b", Block: 4}) {
		t.Fatal("Invalidate dropped the wrong blocks")
	}
	if err := c.Drop(Key{File: "a", Block: 3}); !errors.Is(err, ErrDirty) {
		t.Fatalf("Drop of a dirty block: %v", err)
	}
	if err := c.Drop(Key{File: "b", Block: 4}); err != nil || c.Has(Key{File: "b", Block: 4}) {
		t.Fatalf("Drop: %v", err)
	}
	if err := c.Drop(Key{File: "b", Block: 99}); err != nil {
		t.Fatalf("Drop of an absent block: %v", err)
	}
	n, err = c.DropClean()
	if err != nil || n != 9 {
		t.Fatalf("DropClean = %d, %v; want 9", n, err)
	}
	if st := c.Stats(); st.ValidBlocks != 1 || st.Dropped != 19 {
		t.Fatalf("stats %+v", st)
	}
}

func TestRestartWarm(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{Dir: dir, Capacity: 16 << 20, Ways: 8, BlockSize: 8 << 10}
	c := mustOpen(t, cfg)
	var keys []Key
	for f := range 10 {
		file := fmt.Sprintf("img%d/disk", f)
		for b := range uint64(40) {
			k := Key{File: file, Block: b}
			var err error
			if b%8 == 0 {
				err = c.Write(k, blockData(file, b, 2, c.bs-int(b)))
			} else {
				err = c.Put(k, blockData(file, b, 1, c.bs-int(b)))
			}
			if err != nil {
				t.Fatal(err)
			}
			keys = append(keys, k)
		}
	}
	before := c.Stats()
	must(t, c.Close())
	if err := c.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
	if _, _, err := c.Get(keys[0], make([]byte, c.bs)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Get after Close: %v", err)
	}

	c = mustOpen(t, cfg)
	defer c.Close()
	for _, k := range keys {
		got, ok := get(t, c, k)
		want := uint64(1)
		if k.Block%8 == 0 {
			want = 2
		}
		if v, good := versionOf(k.File, k.Block, got); !ok || !good || v != want || len(got) != c.bs-int(k.Block) {
			t.Fatalf("%v after restart: ok=%v version %d intact=%v len %d", k, ok, v, good, len(got))
		}
	}
	after := c.Stats()
	if after.ValidBlocks != before.ValidBlocks || after.DirtyBlocks != 50 || after.DirtyBytes != before.DirtyBytes {
		t.Fatalf("after restart %+v, before %+v", after, before)
	}
	if files := c.DirtyFiles(); len(files) != 10 || files[0] != "img0/disk" {
		t.Fatalf("DirtyFiles = %v", files)
	}
	if got := c.Dirty("img3/disk"); fmt.Sprint(got) != "[0 8 16 24 32]" {
		t.Fatalf("Dirty = %v", got)
	}
	// Sequence numbers keep growing across restarts.
	k := keys[0]
	_, seq, err := c.ReadDirty(k, make([]byte, c.bs))
	if err != nil {
		t.Fatal(err)
	}
	must(t, c.Write(k, []byte("new")))
	if _, seq2, _ := c.ReadDirty(k, make([]byte, c.bs)); seq2 <= seq {
		t.Fatalf("seq %d after restart, was %d", seq2, seq)
	}
}

func TestRestartKeepsLRU(t *testing.T) {
	cfg := smallConfig(t.TempDir())
	c := mustOpen(t, cfg)
	k := c.sameSet("f", 5)
	for _, key := range k[:4] {
		must(t, c.Put(key, []byte("x")))
	}
	get(t, c, k[0])
	must(t, c.Close())
	c = mustOpen(t, cfg)
	defer c.Close()
	must(t, c.Put(k[4], []byte("y")))
	if !c.Has(k[0]) || c.Has(k[1]) {
		t.Fatal("LRU order was lost across a restart")
	}
}

func TestCrashReopen(t *testing.T) {
	dir := t.TempDir()
	cfg := smallConfig(dir)
	c := mustOpen(t, cfg)
	for b := range uint64(20) {
		must(t, c.Write(Key{File: "disk", Block: b}, blockData("disk", b, 1, c.bs)))
		must(t, c.Put(Key{File: "golden", Block: b}, blockData("golden", b, 0, c.bs)))
	}
	must(t, c.Write(Key{File: "disk", Block: 5}, blockData("disk", 5, 2, c.bs)))
	c.crash()

	c = mustOpen(t, cfg)
	for b := range uint64(20) {
		want := uint64(1)
		if b == 5 {
			want = 2
		}
		got, ok := get(t, c, Key{File: "disk", Block: b})
		if v, good := versionOf("disk", b, got); !ok || !good || v != want {
			t.Fatalf("disk block %d: ok=%v version %d intact=%v", b, ok, v, good)
		}
		got, ok = get(t, c, Key{File: "golden", Block: b})
		if v, good := versionOf("golden", b, got); !ok || !good || v != 0 {
			t.Fatalf("golden block %d: ok=%v intact=%v", b, ok, good)
		}
	}
	if n := len(c.Dirty("disk")); n != 20 {
		t.Fatalf("%d dirty blocks after the crash, want 20", n)
	}
	c.crash()
}

// A crash after a new version's tag is durable but before the old version's
// tag is invalidated leaves both on disk; the newer must win.
func TestCrashBetweenVersions(t *testing.T) {
	dir := t.TempDir()
	cfg := smallConfig(dir)
	c := mustOpen(t, cfg)
	k := Key{File: "disk", Block: 9}
	must(t, c.Write(k, []byte("old version")))
	oldFrame := c.frameOf(k)
	oldTag := make([]byte, tagSize)
	if _, err := c.tags.ReadAt(oldTag, int64(oldFrame)*tagSize); err != nil {
		t.Fatal(err)
	}
	must(t, c.Write(k, []byte("new version")))
	if c.frameOf(k) == oldFrame {
		t.Fatal("the new version overwrote the old one in place")
	}
	if _, err := c.tags.WriteAt(oldTag, int64(oldFrame)*tagSize); err != nil { // undo the invalidation
		t.Fatal(err)
	}
	c.crash()

	c = mustOpen(t, cfg)
	defer c.Close()
	if got, ok := get(t, c, k); !ok || string(got) != "new version" {
		t.Fatalf("after the crash: %q, %v", got, ok)
	}
	if st := c.Stats(); st.ValidBlocks != 1 || st.DirtyBlocks != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestCorruptFrameIsMiss(t *testing.T) {
	dir := t.TempDir()
	cfg := smallConfig(dir)
	c := mustOpen(t, cfg)
	clean := Key{File: "golden", Block: 1}
	other := Key{File: "golden", Block: 2}
	dirty := Key{File: "disk", Block: 1}
	torn := Key{File: "golden", Block: 3}
	for _, k := range []Key{clean, other, torn} {
		must(t, c.Put(k, blockData(k.File, k.Block, 0, c.bs)))
	}
	must(t, c.Write(dirty, blockData(dirty.File, dirty.Block, 1, c.bs)))
	bankPath := func(k Key) (string, int64) {
		bank, off := c.frameLoc(c.frameOf(k))
		return bank.Name(), off
	}
	p, off := bankPath(clean)
	c.crash()
	flipByte(t, p, off+100) // damage while the process is down

	c = mustOpen(t, cfg)
	defer c.Close()
	if got, ok := get(t, c, clean); ok {
		t.Fatalf("a damaged frame was returned (%d bytes)", len(got))
	}
	if c.Has(clean) {
		t.Fatal("the damaged frame is still cached")
	}
	// Damage while open is caught the same way.
	p, off = bankPath(other)
	flipByte(t, p, off+int64(c.bs)-1)
	if _, ok := get(t, c, other); ok {
		t.Fatal("a frame damaged while open was returned")
	}
	// Another block's data in the frame (a torn reuse) is a miss too.
	bank, off := c.frameLoc(c.frameOf(torn))
	if _, err := bank.WriteAt(blockData("golden", 4, 0, c.bs), off); err != nil {
		t.Fatal(err)
	}
	if _, ok := get(t, c, torn); ok {
		t.Fatal("another block's data was returned")
	}
	// A damaged dirty frame is an error, never a miss (which would send the
	// reader to stale upstream data) nor wrong data.
	p, off = bankPath(dirty)
	flipByte(t, p, off)
	buf := make([]byte, c.bs)
	if _, ok, err := c.Get(dirty, buf); ok || !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("damaged dirty frame: ok=%v err=%v", ok, err)
	}
	if _, _, err := c.ReadDirty(dirty, buf); !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("ReadDirty of a damaged dirty frame: %v", err)
	}
	if st := c.Stats(); st.Corrupt != 5 {
		t.Fatalf("Corrupt = %d, want 5", st.Corrupt)
	}
	// The set still works.
	must(t, c.Put(clean, blockData(clean.File, clean.Block, 0, c.bs)))
	if got, ok := get(t, c, clean); !ok || !bytes.Equal(got, blockData(clean.File, clean.Block, 0, c.bs)) {
		t.Fatal("refill after damage failed")
	}
}

func TestCorruptTagIsMiss(t *testing.T) {
	dir := t.TempDir()
	cfg := smallConfig(dir)
	c := mustOpen(t, cfg)
	k := Key{File: "golden", Block: 1}
	must(t, c.Put(k, []byte("data")))
	fi := c.frameOf(k)
	c.crash()
	flipByte(t, filepath.Join(dir, tagsName), int64(fi)*tagSize+10)
	c = mustOpen(t, cfg)
	defer c.Close()
	if _, ok := get(t, c, k); ok {
		t.Fatal("hit through a damaged tag")
	}
	if st := c.Stats(); st.ValidBlocks != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestGeometryChangeRecreates(t *testing.T) {
	dir := t.TempDir()
	cfg := smallConfig(dir)
	c := mustOpen(t, cfg)
	k := Key{File: "golden", Block: 1}
	must(t, c.Put(k, []byte("data")))
	must(t, c.Close())

	core, logs := observer.New(zapcore.InfoLevel)
	cfg2 := cfg
	cfg2.BlockSize = 8 << 10
	cfg2.Logger = zap.New(core)
	c = mustOpen(t, cfg2)
	if c.Has(k) || c.Stats().ValidBlocks != 0 {
		t.Fatal("a recreated cache kept a block")
	}
	if e := logs.FilterMessage("recreating block cache").All(); len(e) != 1 || e[0].Level != zapcore.WarnLevel {
		t.Fatalf("no warning about recreating the cache: %v", logs.All())
	}
	must(t, c.Put(k, []byte("data8k")))
	must(t, c.Write(Key{File: "disk", Block: 0}, []byte("dirty")))
	c.crash()

	// Dirty blocks are never dropped to change geometry.
	cfg3 := cfg2
	cfg3.Ways = 8
	if _, err := Open(cfg3); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("Open with another geometry over dirty blocks: %v", err)
	}
	c = mustOpen(t, cfg2)
	defer c.Close()
	if got, ok := get(t, c, Key{File: "disk", Block: 0}); !ok || string(got) != "dirty" {
		t.Fatal("dirty block lost")
	}
}

func TestOpenTwice(t *testing.T) {
	cfg := smallConfig(t.TempDir())
	c := mustOpen(t, cfg)
	if _, err := Open(cfg); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("second Open of one directory: %v", err)
	}
	c.Close()
	c = mustOpen(t, cfg)
	c.Close()
}

func TestHalfCreatedCacheIsRecreated(t *testing.T) {
	dir := t.TempDir()
	cfg := smallConfig(dir)
	c := mustOpen(t, cfg)
	must(t, c.Put(Key{File: "f", Block: 0}, []byte("x")))
	c.Close()
	must(t, os.Remove(filepath.Join(dir, metaName)))
	c = mustOpen(t, cfg)
	defer c.Close()
	if c.Stats().ValidBlocks != 0 {
		t.Fatal("blocks survived in a cache without a meta file")
	}
}

func TestConfigValidation(t *testing.T) {
	dir := t.TempDir()
	for _, cfg := range []Config{
		{Capacity: 1 << 20, Ways: 4, BlockSize: 4096},
		{Dir: dir, Capacity: 1 << 20, Ways: 4, BlockSize: 3000},
		{Dir: dir, Capacity: 1 << 20, Ways: 4, BlockSize: 2048},
		{Dir: dir, Capacity: 1 << 30, Ways: 4, BlockSize: 2 << 20},
		{Dir: dir, Capacity: 1 << 20, Ways: 0, BlockSize: 4096},
		{Dir: dir, Capacity: 1 << 20, Ways: 65, BlockSize: 4096},
		{Dir: dir, Capacity: 4096, Ways: 4, BlockSize: 4096},
		{Dir: dir, Capacity: 1 << 20, Ways: 4, BlockSize: 4096, Banks: 100},
	} {
		if _, err := Open(cfg); !errdefs.IsInvalidArgument(err) {
			t.Errorf("Open(%+v) = %v, want invalid argument", cfg, err)
		}
	}
	c := mustOpen(t, Config{Dir: dir, Capacity: 1<<20 + 5000, Ways: 4, BlockSize: 4096, Banks: 3})
	defer c.Close()
	st := c.Stats()
	if st.Sets != 64 || st.Banks != 3 || st.Capacity != 1<<20 {
		t.Fatalf("stats %+v", st)
	}
	// Every set's frames are inside its bank file.
	for fi := range c.frames {
		bank, off := c.frameLoc(fi)
		info, err := bank.Stat()
		if err != nil {
			t.Fatal(err)
		}
		if off+int64(c.bs) > info.Size() {
			t.Fatalf("frame %d at %d beyond the end of %s (%d)", fi, off, bank.Name(), info.Size())
		}
	}
	buf := make([]byte, 10)
	if err := c.Put(Key{File: "f"}, make([]byte, 4097)); !errdefs.IsInvalidArgument(err) {
		t.Errorf("Put of an oversize block: %v", err)
	}
	if err := c.Put(Key{File: "f"}, nil); !errdefs.IsInvalidArgument(err) {
		t.Errorf("Put of an empty block: %v", err)
	}
	if err := c.Put(Key{}, buf); !errdefs.IsInvalidArgument(err) {
		t.Errorf("Put with no file id: %v", err)
	}
	must(t, c.Put(Key{File: "f"}, make([]byte, 100)))
	if _, _, err := c.Get(Key{File: "f"}, buf); !errdefs.IsInvalidArgument(err) {
		t.Errorf("Get into a short buffer: %v", err)
	}
}

// Writers of the same blocks in a set whose every way is dirty: each
// rewrite needs the one spare frame, so they queue for it.
func TestConcurrentRewritesOfFullSet(t *testing.T) {
	c := mustOpen(t, smallConfig(t.TempDir()))
	defer c.Close()
	keys := c.sameSet("disk", 4)
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for g := range 8 {
		wg.Go(func() {
			for i := range 30 {
				k := keys[(g+i)%len(keys)]
				if err := c.Write(k, blockData(k.File, k.Block, uint64(g*1000+i), 512)); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Go(func() {
		buf := make([]byte, c.bs)
		for i := range 500 {
			k := keys[i%len(keys)]
			n, ok, err := c.Get(k, buf)
			if err != nil {
				errs <- err
				return
			}
			if _, good := versionOf(k.File, k.Block, buf[:n]); ok && !good {
				errs <- fmt.Errorf("%v: torn data", k)
				return
			}
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := c.Stats()
	if st.ValidBlocks != 4 || st.DirtyBlocks != 4 || st.Writes != 240 {
		t.Fatalf("stats %+v", st)
	}
}
