package gvfs

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// The read path of a block-policy file, top to bottom: ReadAt clips the
// range, readAhead looks at the reader, readCached answers every block it
// can from zero-block meta-data and the block cache, and readMisses waits
// for the rest, which fetch asks the upstream for (joining fetches already
// in flight), fetchRun receives and accept verifies and caches.

// blockFile is what golden files and disks share: the block engine.
type blockFile struct {
	p       *Proxy
	image   string
	meta    *imagev1.FileMeta
	key     string // block cache id
	created time.Time
	// zeroMap and digests are a golden file's meta-data; a disk, whose
	// blocks change, has neither.
	zeroMap, digests []byte
	// cacheZeros caches fetched zero blocks: without a zero map every read
	// of them would go upstream again.
	cacheZeros bool

	raMu sync.Mutex
	ra   readAheadState
	held atomic.Int32 // Hold
}

type readAheadState struct {
	lastEnd int64
	window  int
	next    uint64
}

type blockKey struct {
	file  string
	block uint64
}

type fetch struct {
	done chan struct{}
	data []byte // nil for a zero block
	err  error
}

// miss is a block readCached could not answer.
type miss struct {
	idx uint64
	dst []byte // the part of the caller's buffer this block fills
	in  int64  // offset of that part within the block
}

func (f *blockFile) Image() string           { return f.image }
func (f *blockFile) Meta() *imagev1.FileMeta { return f.meta }
func (f *blockFile) Size() uint64            { return f.meta.Size }
func (f *blockFile) Created() time.Time      { return f.created }
func (f *blockFile) Cached(idx uint64) bool  { return f.p.cache.Has(f.key, idx) }
func (f *blockFile) blockSize() uint64       { return uint64(f.meta.BlockSize) }
func (f *blockFile) blockLen(idx uint64) uint64 {
	bs := f.blockSize()
	return min(bs, f.meta.Size-idx*bs)
}

// zero reports whether a block is all zero per the meta-data.
func (f *blockFile) zero(idx uint64) bool {
	return f.zeroMap != nil && blockproto.IsZeroRange(f.zeroMap, idx*f.blockSize(), f.blockLen(idx))
}

// digest is the manifest digest of a block (nil without one).
func (f *blockFile) digest(idx uint64) []byte {
	if f.digests == nil {
		return nil
	}
	return f.digests[idx*blockproto.DigestSize : (idx+1)*blockproto.DigestSize]
}

// clip checks off and cuts dst at the end of the file.
func (f *blockFile) clip(dst []byte, off int64) ([]byte, error) {
	if off < 0 {
		return nil, fmt.Errorf("negative offset %d: %w", off, errdefs.ErrInvalidArgument)
	}
	size := int64(f.meta.Size)
	if off >= size {
		return nil, nil
	}
	return dst[:min(off+int64(len(dst)), size)-off], nil
}

var scratchPool = sync.Pool{New: func() any { b := make([]byte, imagev1.MaxBlockSize); return &b }}

// readAt reads a clipped range through the block engine.
func (f *blockFile) readAt(ctx context.Context, dst []byte, off int64) (int, error) {
	bs := int64(f.blockSize())
	f.observe(uint64(off/bs), uint64((off+int64(len(dst))-1)/bs)) // profiles
	if !f.memoryImage() {
		// A guest's page faults on a RAM file come with the kernel's
		// read-around (the memory view's small read-ahead); neighbouring
		// faults are no sequential reader.
		f.readAhead(off, off+int64(len(dst)))
	}
	misses, err := f.readCached(dst, off)
	if err != nil {
		return 0, err
	}
	if err := f.readMisses(ctx, misses); err != nil {
		return 0, err
	}
	return len(dst), nil
}

// readCached fills the blocks of dst that the zero-block meta-data or the
// block cache answer, and returns the others.
func (f *blockFile) readCached(dst []byte, off int64) ([]miss, error) {
	bs := int64(f.blockSize())
	end := off + int64(len(dst))
	var misses []miss
	var scratch []byte
	for idx := uint64(off / bs); idx <= uint64((end-1)/bs); idx++ {
		bstart := int64(idx) * bs
		lo, hi := max(off, bstart), min(end, bstart+bs)
		part := dst[lo-off : hi-off]
		if f.zero(idx) {
			clear(part)
			f.p.stats.ZeroBlocks.Add(1)
			continue
		}
		whole := lo == bstart && hi-lo == int64(f.blockLen(idx))
		buf := part
		if !whole {
			if scratch == nil {
				// Small random reads (a guest's 4 KiB pages) take this path
				// for every block: reuse the block-sized buffer.
				sp := scratchPool.Get().(*[]byte)
				defer scratchPool.Put(sp)
				scratch = (*sp)[:bs]
			}
			buf = scratch
		}
		n, ok, err := f.p.cache.Get(f.key, idx, buf)
		if err != nil {
			return nil, err
		}
		if ok && n == int(f.blockLen(idx)) {
			if !whole {
				copy(part, buf[lo-bstart:hi-bstart])
			}
			f.p.stats.Hits.Add(1)
			continue
		}
		f.p.stats.Misses.Add(1)
		misses = append(misses, miss{idx: idx, dst: part, in: lo - bstart})
	}
	return misses, nil
}

// readMisses fetches the missed blocks and copies them in as they arrive.
func (f *blockFile) readMisses(ctx context.Context, misses []miss) error {
	if len(misses) == 0 {
		return nil
	}
	idxs := make([]uint64, len(misses))
	for i, m := range misses {
		idxs[i] = m.idx
	}
	for i, fe := range f.p.fetch(f, idxs) {
		data, err := fe.wait(ctx)
		if err != nil {
			return err
		}
		m := misses[i]
		if data == nil {
			clear(m.dst)
		} else {
			copy(m.dst, data[m.in:])
		}
	}
	return nil
}

func (fe *fetch) wait(ctx context.Context) ([]byte, error) {
	select {
	case <-fe.done:
		return fe.data, fe.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// readBlock returns one whole block, or zero for a zero block: from the
// meta-data, the cache (into buf) or one upstream fetch.
func (f *blockFile) readBlock(ctx context.Context, idx uint64, buf []byte) (data []byte, zero bool, err error) {
	if idx*f.blockSize() >= f.meta.Size {
		return nil, false, fmt.Errorf("block %d of %s/%s is past its end: %w", idx, f.image, f.meta.Name, errdefs.ErrOutOfRange)
	}
	if f.zero(idx) {
		f.p.stats.ZeroBlocks.Add(1)
		return nil, true, nil
	}
	n := int(f.blockLen(idx))
	if got, ok, err := f.p.cache.Get(f.key, idx, buf[:n]); err != nil {
		return nil, false, err
	} else if ok && got == n {
		f.p.stats.Hits.Add(1)
		return buf[:n], false, nil
	}
	f.p.stats.Misses.Add(1)
	data, err = f.p.fetch(f, []uint64{idx})[0].wait(ctx)
	if err != nil {
		return nil, false, err
	}
	return data, data == nil, nil
}

// readRange serves the whole-file channel of a cache proxy: read is the
// file's own ReadAt (a golden whole-file file reads from the file cache).
func (f *blockFile) readRange(ctx context.Context, off uint64, buf []byte, read func(context.Context, []byte, int64) (int, error)) (bool, error) {
	if f.zeroMap != nil && blockproto.IsZeroRange(f.zeroMap, off, uint64(len(buf))) {
		return true, nil
	}
	if _, err := read(ctx, buf, int64(off)); err != nil {
		return false, err
	}
	return blockproto.IsZero(buf), nil
}

// maxRunBytes bounds one upstream request. Requests are pipelined on one
// stream, so more, smaller requests cost no round trips, and a reader waits
// only for the request holding its block: a request is answered (and its
// blocks verified and cached) as a whole.
const maxRunBytes = 1 << 20

// errClosed answers reads that arrive while the proxy closes.
var errClosed = fmt.Errorf("the proxy is closed: %w", errdefs.ErrUnavailable)

// fetch returns one fetch per block, as demand reads.
func (p *Proxy) fetch(f *blockFile, idxs []uint64) []*fetch {
	return p.fetchClass(f, idxs, Demand)
}

// bulkRunBytes bounds one request of the bulk classes: a demand read that
// joins a bulk fetch of its block waits for no more than this.
const bulkRunBytes = 256 << 10

// fetchClass returns one fetch per block, joining fetches already in
// flight and asking the upstream for the others in runs of consecutive
// blocks, in class c.
func (p *Proxy) fetchClass(f *blockFile, idxs []uint64, c Class) []*fetch {
	out := make([]*fetch, len(idxs))
	var mine, late []uint64
	var mineF []*fetch
	var lateI []int
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		fe := &fetch{done: make(chan struct{}), err: errClosed}
		close(fe.done)
		for i := range out {
			out[i] = fe
		}
		return out
	}
	for i, idx := range idxs {
		k := blockKey{f.key, idx}
		if fe := p.inflight[k]; fe != nil {
			out[i] = fe
			p.stats.Collapsed.Add(1)
			continue
		}
		// A fetch fills the cache before it leaves the in-flight table, so
		// a block the caller missed may have arrived since: don't fetch it
		// twice.
		if p.cache.Has(f.key, idx) {
			late, lateI = append(late, idx), append(lateI, i)
			continue
		}
		fe := &fetch{done: make(chan struct{})}
		p.inflight[k] = fe
		out[i] = fe
		mine = append(mine, idx)
		mineF = append(mineF, fe)
	}
	runBytes := maxRunBytes
	if c != Demand {
		runBytes = bulkRunBytes
	}
	runs := consecutiveRuns(mine, max(1, runBytes/int(f.blockSize())))
	p.bg.Add(len(runs)) // under p.mu: Close waits for these
	p.mu.Unlock()
	for _, r := range runs {
		go p.fetchRun(f, mine[r[0]:r[1]], mineF[r[0]:r[1]], c)
	}
	for j, idx := range late {
		out[lateI[j]] = p.cachedFetch(f, idx)
	}
	return out
}

// consecutiveRuns cuts sorted block numbers into runs of consecutive
// blocks of at most maxRun, as [start, end) index pairs.
func consecutiveRuns(idxs []uint64, maxRun int) [][2]int {
	var runs [][2]int
	for start := 0; start < len(idxs); {
		end := start + 1
		for end < len(idxs) && idxs[end] == idxs[end-1]+1 && end-start < maxRun {
			end++
		}
		runs = append(runs, [2]int{start, end})
		start = end
	}
	return runs
}

// cachedFetch answers a block that arrived in the cache after the caller
// missed it, or fetches it when it was evicted again meanwhile.
func (p *Proxy) cachedFetch(f *blockFile, idx uint64) *fetch {
	buf := make([]byte, f.blockLen(idx))
	if n, ok, err := p.cache.Get(f.key, idx, buf); err == nil && ok && n == len(buf) {
		fe := &fetch{done: make(chan struct{}), data: buf}
		close(fe.done)
		p.stats.Collapsed.Add(1)
		return fe
	}
	return p.fetch(f, []uint64{idx})[0]
}

func (p *Proxy) fetchRun(f *blockFile, idxs []uint64, fes []*fetch, c Class) {
	defer p.bg.Done()
	var res []blockproto.BlockResult
	window := p.cfg.UpstreamRetry
	if f.patient() {
		window = forever
	}
	bytes := len(idxs) * int(f.blockSize())
	p.noteRequest(f, c)
	err := p.up.retry(p.ctx, window, func() error {
		p.stats.Requests.Add(1)
		p.stats.ClassRequests[c].Add(1)
		var err error
		res, err = p.up.ReadBlocksClass(p.ctx, c, f.image, f.meta.Name, idxs[0], uint32(len(idxs)), bytes)
		return err
	})
	for i, fe := range fes {
		if err != nil {
			fe.err = err
		} else {
			fe.data, fe.err = p.accept(f, idxs[i], res[i])
		}
		// Each block's readers go on as soon as it is in the cache.
		p.mu.Lock()
		delete(p.inflight, blockKey{f.key, idxs[i]})
		p.mu.Unlock()
		close(fe.done)
	}
}

var zeroBlock = make([]byte, imagev1.MaxBlockSize)

// accept checks a fetched block and fills the cache with it.
func (p *Proxy) accept(f *blockFile, idx uint64, r blockproto.BlockResult) ([]byte, error) {
	want := f.digest(idx)
	if want == nil {
		want = r.Digest // a disk: trust the server's digest, check transport
	}
	if err := blockproto.VerifyBlock(r, want); err != nil {
		return nil, fmt.Errorf("%s/%s: %w", f.image, f.meta.Name, err)
	}
	p.stats.FetchedBlocks.Add(1)
	if r.Zero {
		if f.cacheZeros {
			p.fill(f, idx, zeroBlock[:r.Length])
		}
		return nil, nil
	}
	p.stats.FetchedBytes.Add(uint64(len(r.Data)))
	p.fill(f, idx, r.Data)
	return r.Data, nil
}

// fill caches a verified block (no digest, so the cache does not hash it
// again); a block that does not fit is only not cached.
func (p *Proxy) fill(f *blockFile, idx uint64, data []byte) {
	if err := p.cache.Fill(f.key, idx, data, nil); err != nil {
		p.log.Debug("block not cached", zap.String("file", f.key), zap.Uint64("block", idx), zap.Error(err))
	}
}

// readAhead detects sequential readers and fetches ahead of them, doubling
// the window up to Config.ReadAhead, so a long read costs bytes ÷ bandwidth
// rather than round trips.
//
// The kernel's own read-ahead sends several large reads of one stream at
// once and they arrive in any order, so a read counts as sequential when it
// starts near the furthest end read so far (within a few times its own
// length, up to the kernel's read-ahead window), not only exactly there.
// Any other read is a seek: the window and the read-ahead position start
// over.
func (f *blockFile) readAhead(off, end int64) {
	from, to, ok := f.aheadRange(off, end)
	if !ok {
		return
	}
	var want []uint64
	for idx := from; idx < to; idx++ {
		if !f.zero(idx) && !f.p.cache.Has(f.key, idx) {
			want = append(want, idx)
		}
	}
	if len(want) > 0 {
		f.p.stats.Prefetched.Add(uint64(len(want)))
		f.p.fetch(f, want)
	}
}

// aheadRange moves the read-ahead state past [off, end) and returns the
// blocks to fetch ahead, if any.
func (f *blockFile) aheadRange(off, end int64) (from, to uint64, ok bool) {
	limit := f.p.cfg.ReadAhead
	if limit <= 0 {
		return 0, 0, false
	}
	f.raMu.Lock()
	defer f.raMu.Unlock()
	ra := &f.ra
	tol := min(4*(end-off), ReadAheadKB<<10)
	if ra.lastEnd < 0 || off < ra.lastEnd-tol || off > ra.lastEnd+tol {
		ra.lastEnd, ra.window, ra.next = end, 0, 0
		return 0, 0, false
	}
	ra.lastEnd = max(ra.lastEnd, end)
	ra.window = min(max(2*ra.window, 1<<20), limit)
	bs := int64(f.blockSize())
	from = max(uint64((ra.lastEnd+bs-1)/bs), ra.next)
	to = min(uint64((ra.lastEnd+int64(ra.window)+bs-1)/bs), (f.meta.Size+uint64(bs)-1)/uint64(bs))
	if from >= to {
		return 0, 0, false
	}
	ra.next = to
	return from, to, true
}

// StartRun starts fetching the blocks [first, first+count) that are
// neither zero nor cached, in class c, in runs: a cache proxy asked for a
// run asks its upstream for it once, and the block-by-block reads that
// answer the request join those fetches (blockproto.RunStarter).
func (f *blockFile) StartRun(c Class, first uint64, count uint32) {
	var want []uint64
	for idx := first; idx-first < uint64(count); idx++ { // count is at most MaxBlocksPerReq
		if f.absent(idx) {
			want = append(want, idx)
		}
	}
	if len(want) > 0 {
		f.p.fetchClass(f, want, c)
	}
}

// absent reports whether block idx is in the file, not zero and not
// cached: one to fetch.
func (f *blockFile) absent(idx uint64) bool {
	return idx < (f.meta.Size+f.blockSize()-1)/f.blockSize() && !f.zero(idx) && !f.p.cache.Has(f.key, idx)
}

// Prefetch fetches the given blocks of a file in the background, in the
// prefetch class (working-set profiles), and returns the blocks it asked
// for (those not zero and not cached).
func (f *blockFile) Prefetch(idxs []uint64) []uint64 {
	var want []uint64
	for _, idx := range idxs {
		if f.absent(idx) {
			want = append(want, idx)
		}
	}
	f.p.stats.Prefetched.Add(uint64(len(want)))
	f.p.fetchClass(f, want, Prefetch)
	return want
}
