package blockcache

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// writtenKey is the reference state of a block that writers change.
type writtenKey struct {
	mu        sync.Mutex    // one writer at a time, like a block device
	started   atomic.Uint64 // highest version a writer began
	committed atomic.Uint64 // highest version a Write returned for
	cleaned   atomic.Bool   // MarkClean was called at least once
}

// TestParallel runs readers, writers, a flusher and clean fills over
// overlapping keys in a cache much smaller than the keys (so evictions and
// full sets happen) and checks every result against a reference.
func TestParallel(t *testing.T) {
	cfg := smallConfig(t.TempDir())
	cfg.UnsafeNoFsync = true // thousands of writes; ordering is tested elsewhere
	c := mustOpen(t, cfg)
	defer c.Close()

	const files, blocks = 4, 64
	written := map[Key]*writtenKey{}
	var wkeys, rkeys []Key
	for f := range files {
		for b := range uint64(blocks) {
			k := Key{File: fmt.Sprintf("disk%d", f), Block: b}
			written[k] = &writtenKey{}
			wkeys = append(wkeys, k)
			rkeys = append(rkeys, Key{File: fmt.Sprintf("golden%d", f), Block: b})
		}
	}
	var upstreamMu sync.Mutex
	upstream := map[Key]uint64{} // version written back

	errs := make(chan error, 64)
	fail := func(format string, args ...any) {
		select {
		case errs <- fmt.Errorf(format, args...):
		default:
		}
	}
	var writers, others sync.WaitGroup
	done := make(chan struct{})

	for g := range 4 {
		writers.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for range 400 {
				k := wkeys[r.IntN(len(wkeys))]
				w := written[k]
				w.mu.Lock()
				v := w.started.Add(1)
				err := c.Write(k, blockData(k.File, k.Block, v, 256+r.IntN(c.bs-256)))
				switch {
				case err == nil:
					w.committed.Store(v)
				case !errors.Is(err, ErrSetFull):
					fail("Write %v: %v", k, err)
				}
				w.mu.Unlock()
			}
		})
	}
	for g := range 6 {
		others.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 2))
			buf := make([]byte, c.bs)
			for i := 0; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				if i%2 == 0 { // a golden block: fill on miss
					k := rkeys[r.IntN(len(rkeys))]
					want := blockData(k.File, k.Block, 0, 1000+int(k.Block))
					n, ok, err := c.Get(k, buf)
					switch {
					case err != nil:
						fail("Get %v: %v", k, err)
					case ok && !bytes.Equal(buf[:n], want):
						fail("Get %v: wrong data", k)
					case !ok:
						if err := c.Put(k, want); err != nil && !errors.Is(err, ErrSetFull) {
							fail("Put %v: %v", k, err)
						}
					}
					continue
				}
				k := wkeys[r.IntN(len(wkeys))]
				w := written[k]
				lo := w.committed.Load()
				n, ok, err := c.Get(k, buf)
				hi := w.started.Load()
				if err != nil {
					fail("Get %v: %v", k, err)
					continue
				}
				if !ok {
					if lo > 0 && !w.cleaned.Load() {
						fail("Get %v: miss on a dirty block (version %d)", k, lo)
					}
					continue
				}
				v, good := versionOf(k.File, k.Block, buf[:n])
				if !good || v < lo || v > hi {
					fail("Get %v: version %d (intact %v), want %d..%d", k, v, good, lo, hi)
				}
			}
		})
	}
	flush := func() {
		buf := make([]byte, c.bs)
		for _, file := range c.DirtyFiles() {
			for _, b := range c.Dirty(file) {
				k := Key{File: file, Block: b}
				n, seq, err := c.ReadDirty(k, buf)
				if errdefs.IsNotFound(err) {
					continue
				}
				if err != nil {
					fail("ReadDirty %v: %v", k, err)
					return
				}
				v, good := versionOf(k.File, k.Block, buf[:n])
				if !good || v == 0 || v > written[k].started.Load() {
					fail("ReadDirty %v: version %d intact %v", k, v, good)
				}
				upstreamMu.Lock()
				upstream[k] = v
				upstreamMu.Unlock()
				written[k].cleaned.Store(true)
				if err := c.MarkClean(k, seq); err != nil && !errors.Is(err, ErrStale) {
					fail("MarkClean %v: %v", k, err)
				}
			}
		}
	}
	others.Go(func() {
		for {
			select {
			case <-done:
				return
			default:
				flush()
			}
		}
	})
	writers.Wait()
	close(done)
	others.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	flush()
	if files := c.DirtyFiles(); len(files) != 0 {
		t.Fatalf("dirty after the last flush: %v", files)
	}
	for k, w := range written {
		if v := w.committed.Load(); v > 0 && upstream[k] != v {
			t.Errorf("%v: written back version %d, last write %d", k, upstream[k], v)
		}
	}
	st := c.Stats()
	t.Logf("%+v", st)
	if st.Evictions == 0 || st.Writes == 0 || st.Cleaned == 0 || st.Hits == 0 {
		t.Fatalf("the test did not exercise the cache: %+v", st)
	}
}
