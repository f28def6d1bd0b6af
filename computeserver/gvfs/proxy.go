package gvfs

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// blockCache is what the proxy needs of the disk block cache (an adapter
// over package blockcache implements it). Files are opaque ids.
type blockCache interface {
	Get(file string, block uint64, dst []byte) (int, bool, error)
	Has(file string, block uint64) bool
	// Fill stores a clean block, checking it against digest when one is
	// given; it never replaces a dirty block.
	Fill(file string, block uint64, data, digest []byte) error
	// Write stores a dirty block durably.
	Write(file string, block uint64, data []byte) error
	DirtyFiles() []string
	Dirty(file string) []uint64
	// ReadDirty returns a dirty block and its write sequence, for a flush.
	ReadDirty(file string, block uint64, dst []byte) (n int, seq uint64, ok bool, err error)
	MarkClean(file string, block uint64, seq uint64) error
	Invalidate(file string) int
	DropClean() int
	BlockSize() int
	Usage() (cached, capacity, dirty uint64)
	Close() error
}

// Config configures a Proxy.
type Config struct {
	Upstream *Upstream
	// Dir holds the block cache, the file cache and per-disk state.
	Dir   string
	Cache CacheConfig
	// ReadAhead is the most a sequential reader is read ahead (default 32 MiB).
	ReadAhead int
	// FlushIdle writes dirty disks back after this long without writes
	// (default 30s; negative disables).
	FlushIdle time.Duration
	// GoldenRecheck is how long a golden image's manifest is used before
	// the upstream is asked again (default 5s): an image never changes,
	// but its name may be deleted and published again with other files.
	GoldenRecheck time.Duration
	Logger        *zap.Logger
}

// CacheConfig is the geometry of the disk block cache.
type CacheConfig struct {
	Capacity  int64 // bytes (default 4 GiB)
	Ways      int   // associativity (default 8)
	BlockSize int   // frame size, 4 KiB..1 MiB (default 64 KiB)
}

// Proxy is the client-side GVFS proxy: it answers reads of image files from
// zero-block meta-data, the disk block cache or the file cache, and fetches
// the rest from its upstream, collapsing concurrent misses and reading ahead
// of sequential readers. Writes to persistent disks stay in the cache as
// dirty blocks until a flush writes them back.
type Proxy struct {
	up        *Upstream
	cache     blockCache
	files     *FileCache
	log       *zap.Logger
	dir       string
	readAhead int
	flushIdle time.Duration
	// goldenRecheck: Config.GoldenRecheck.
	goldenRecheck time.Duration
	stats         Stats

	mu        sync.Mutex
	manifests map[string]*manifestEntry
	open      map[[2]string]*File
	inflight  map[blockKey]*fetch
	servers   []*fuse.Server
	roots     []*fs.Inode
	disks     map[string]*diskState
	closed    bool
	bg        sync.WaitGroup // upstream fetches in flight
	flushHist prometheus.Histogram
}

// Stats counts what the proxy did (all fields atomic).
type Stats struct {
	Hits, Misses, ZeroBlocks, Collapsed     atomic.Uint64
	FetchedBlocks, FetchedBytes, Prefetched atomic.Uint64
	// Requests counts ReadBlocks requests sent upstream (each one a round
	// trip, pipelined with the others on one stream).
	Requests               atomic.Uint64
	Flushes, FlushedBlocks atomic.Uint64
	FlushNanos             atomic.Int64
}

type manifestEntry struct {
	m       *imagev1.Manifest
	fetched time.Time
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

// New opens the caches in cfg.Dir and returns a proxy over cfg.Upstream.
// Dirty blocks left by a previous run are kept; call FlushAll to write them
// back (the compute server does so at start).
func New(cfg Config) (*Proxy, error) {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.ReadAhead == 0 {
		cfg.ReadAhead = 32 << 20
	}
	if cfg.FlushIdle == 0 {
		cfg.FlushIdle = 30 * time.Second
	}
	if cfg.GoldenRecheck <= 0 {
		cfg.GoldenRecheck = 5 * time.Second
	}
	cache, err := openBlockCache(filepath.Join(cfg.Dir, "blocks"), cfg.Cache, cfg.Logger)
	if err != nil {
		return nil, err
	}
	files, err := NewFileCache(filepath.Join(cfg.Dir, "files"), cfg.Upstream, cfg.Logger)
	if err != nil {
		cache.Close()
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, "disks"), 0o755); err != nil {
		cache.Close()
		return nil, err
	}
	return &Proxy{
		up: cfg.Upstream, cache: cache, files: files, log: cfg.Logger, dir: cfg.Dir,
		readAhead: cfg.ReadAhead, flushIdle: cfg.FlushIdle, goldenRecheck: cfg.GoldenRecheck,
		manifests: map[string]*manifestEntry{}, open: map[[2]string]*File{},
		inflight: map[blockKey]*fetch{}, disks: map[string]*diskState{},
		flushHist: newFlushHistogram(),
	}, nil
}

// Stats returns the proxy's counters.
func (p *Proxy) Stats() *Stats { return &p.stats }

// Upstream is the tier this proxy reads from.
func (p *Proxy) Upstream() *Upstream { return p.up }

// FileCache is the whole-file cache.
func (p *Proxy) FileCache() *FileCache { return p.files }

// Image returns the FULL manifest of an image or disk. Golden manifests are
// rechecked after Config.GoldenRecheck, disk manifests after diskTimeout; while the
// upstream is unavailable the last answer holds.
func (p *Proxy) Image(ctx context.Context, name string) (*imagev1.Manifest, error) {
	p.mu.Lock()
	e := p.manifests[name]
	p.mu.Unlock()
	if e != nil && time.Since(e.fetched) < p.recheck(e.m) {
		return e.m, nil
	}
	asked := time.Now()
	var m *imagev1.Manifest
	var err error
	if e != nil && !e.m.Writable {
		// A recheck: the basic view (no block digests, no zero maps) tells
		// whether the name still holds the same files.
		if m, err = p.up.Summary(ctx, name); err == nil && sameGolden(e.m, m) {
			p.mu.Lock()
			if p.manifests[name] == e {
				p.manifests[name] = &manifestEntry{m: e.m, fetched: time.Now()}
			}
			p.mu.Unlock()
			return e.m, nil
		}
	}
	if err == nil {
		m, err = p.up.Manifest(ctx, name)
	}
	if err != nil {
		if e != nil && errdefs.IsUnavailable(err) {
			return e.m, nil // the upstream is away: what we know still holds
		}
		if e != nil && errdefs.IsNotFound(err) {
			p.mu.Lock()
			if p.manifests[name] == e {
				delete(p.manifests, name)
			}
			p.mu.Unlock()
		}
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	// A flush of ours that committed while we asked has stored a newer
	// generation than this answer may carry: keep that one.
	if cur := p.manifests[name]; cur != nil && cur.fetched.After(asked) {
		return cur.m, nil
	}
	if e != nil && !m.Writable && sameGolden(e.m, m) {
		m = e.m // the same image: keep the manifest its open files hold
	}
	p.manifests[name] = &manifestEntry{m: m, fetched: time.Now()}
	return m, nil
}

// sameGolden reports whether two manifests of a golden image name describe
// the same publication.
func sameGolden(a, b *imagev1.Manifest) bool {
	if a.Writable || a.CreatedUnixNano != b.CreatedUnixNano || len(a.Files) != len(b.Files) {
		return false
	}
	for i := range a.Files {
		if a.Files[i].Name != b.Files[i].Name || !bytes.Equal(a.Files[i].Sha256, b.Files[i].Sha256) {
			return false
		}
	}
	return true
}

func (p *Proxy) recheck(m *imagev1.Manifest) time.Duration {
	if m.Writable {
		return diskTimeout
	}
	return p.goldenRecheck
}

// committed records the generation of a disk after a flush of ours, so the
// manifest we keep does not make our own write look like someone else's.
func (p *Proxy) committed(disk string, gen uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if e := p.manifests[disk]; e != nil {
		m := proto.Clone(e.m).(*imagev1.Manifest)
		m.Generation = gen
		p.manifests[disk] = &manifestEntry{m: m, fetched: time.Now()}
	}
}

// File is an open image file.
type File struct {
	p       *Proxy
	image   string
	meta    *imagev1.FileMeta
	digests []byte
	zeroMap []byte
	key     string // block cache id
	disk    *diskState
	created time.Time

	raMu    sync.Mutex
	lastEnd int64
	window  int
	raNext  uint64
}

// Size is the file's size in bytes.
func (f *File) Size() uint64 { return f.meta.Size }

// Writable reports whether the file is a persistent disk.
func (f *File) Writable() bool { return f.disk != nil }

// Meta is the file's meta-data.
func (f *File) Meta() *imagev1.FileMeta { return f.meta }

// Open resolves an image's file.
func (p *Proxy) Open(ctx context.Context, image, file string) (*File, error) {
	m, err := p.Image(ctx, image)
	if err != nil {
		return nil, err
	}
	meta, err := fileOf(m, file)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	f := p.open[[2]string{image, file}]
	if f == nil || (f.disk == nil && f.meta != meta) {
		f = &File{p: p, image: image, meta: meta, created: time.Unix(0, m.CreatedUnixNano), lastEnd: -1}
		if m.Writable {
			f.key = diskKey(image)
			f.disk = p.diskLocked(image)
		} else {
			f.key = "f-" + hex.EncodeToString(meta.Sha256[:16])
			f.digests, f.zeroMap = meta.BlockDigests, meta.ZeroMap
		}
		p.open[[2]string{image, file}] = f
	}
	p.mu.Unlock()
	if f.disk != nil {
		// Every open of a disk, not only the first, checks whether another
		// plant wrote it (session consistency). Outside p.mu: dropping
		// stale blocks scans the cache.
		f.disk.observe(m.Generation, p)
	}
	return f, nil
}

func diskKey(name string) string { return "d-" + name }

func (f *File) blockSize() uint64 { return uint64(f.meta.BlockSize) }

func (f *File) blockLen(idx uint64) uint64 {
	bs := f.blockSize()
	return min(bs, f.meta.Size-idx*bs)
}

// zero reports whether a golden block is all zero per the meta-data.
func (f *File) zero(idx uint64) bool {
	return f.zeroMap != nil && blockproto.IsZeroRange(f.zeroMap, idx*f.blockSize(), f.blockLen(idx))
}

var scratchPool = sync.Pool{New: func() any { b := make([]byte, imagev1.MaxBlockSize); return &b }}

// ReadAt reads len(dst) bytes at off (fewer at the end of the file).
func (f *File) ReadAt(ctx context.Context, dst []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d: %w", off, errdefs.ErrInvalidArgument)
	}
	size := int64(f.meta.Size)
	if off >= size {
		return 0, nil
	}
	end := min(off+int64(len(dst)), size)
	dst = dst[:end-off]
	if f.disk == nil && f.meta.Policy == imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE {
		return f.p.files.ReadAt(ctx, f.image, f.meta, dst, off)
	}
	f.readAhead(off, end)
	bs := int64(f.blockSize())
	first, last := uint64(off/bs), uint64((end-1)/bs)
	type miss struct {
		idx uint64
		dst []byte // the part of dst this block fills
		in  int64  // offset of that part within the block
	}
	var misses []miss
	var scratch []byte
	for idx := first; idx <= last; idx++ {
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
			return 0, err
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
	if len(misses) == 0 {
		return len(dst), nil
	}
	idxs := make([]uint64, len(misses))
	for i, m := range misses {
		idxs[i] = m.idx
	}
	fetches := f.p.fetch(f, idxs)
	for i, fe := range fetches {
		select {
		case <-fe.done:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		if fe.err != nil {
			return 0, fe.err
		}
		m := misses[i]
		if fe.data == nil {
			clear(m.dst)
		} else {
			copy(m.dst, fe.data[m.in:])
		}
	}
	return len(dst), nil
}

// ReadBlock returns one whole block (nil data for a zero golden block) and
// its digest, for the cache proxy's ReadBlocks.
func (f *File) ReadBlock(ctx context.Context, idx uint64, buf []byte) (data []byte, zero bool, err error) {
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
		if f.disk != nil && blockproto.IsZero(buf[:n]) {
			return nil, true, nil // zeros of a disk stay off the wire
		}
		return buf[:n], false, nil
	}
	f.p.stats.Misses.Add(1)
	fe := f.p.fetch(f, []uint64{idx})[0]
	select {
	case <-fe.done:
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
	if fe.err != nil {
		return nil, false, fe.err
	}
	if fe.data == nil {
		return nil, true, nil
	}
	return fe.data, false, nil
}

// Cached reports whether block idx is in the block cache, without reading
// it or counting a hit (benchmarks use it to see what a clone fetched).
func (f *File) Cached(idx uint64) bool { return f.p.cache.Has(f.key, idx) }

// Digest is the manifest digest of a golden block (nil for disks).
func (f *File) Digest(idx uint64) []byte {
	if f.digests == nil {
		return nil
	}
	return f.digests[idx*blockproto.DigestSize : (idx+1)*blockproto.DigestSize]
}

// maxRunBytes bounds one upstream request. Requests are pipelined on one
// stream, so more, smaller requests cost no round trips, and a reader waits
// only for the request holding its block: a request is answered (and its
// blocks verified and cached) as a whole.
const maxRunBytes = 1 << 20

// errClosed answers reads that arrive while the proxy closes.
var errClosed = fmt.Errorf("the proxy is closed: %w", errdefs.ErrUnavailable)

// fetch returns one fetch per block, joining fetches already in flight and
// asking the upstream for the others in runs of consecutive blocks.
func (p *Proxy) fetch(f *File, idxs []uint64) []*fetch {
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
	var runs [][2]int
	maxRun := max(1, maxRunBytes/int(f.blockSize()))
	for start := 0; start < len(mine); {
		end := start + 1
		for end < len(mine) && mine[end] == mine[end-1]+1 && end-start < maxRun {
			end++
		}
		runs = append(runs, [2]int{start, end})
		start = end
	}
	p.bg.Add(len(runs)) // under p.mu: Close waits for these
	p.mu.Unlock()
	for _, r := range runs {
		go p.fetchRun(f, mine[r[0]:r[1]], mineF[r[0]:r[1]])
	}
	for j, idx := range late {
		buf := make([]byte, f.blockLen(idx))
		if n, ok, err := p.cache.Get(f.key, idx, buf); err == nil && ok && n == len(buf) {
			fe := &fetch{done: make(chan struct{}), data: buf}
			close(fe.done)
			out[lateI[j]] = fe
			p.stats.Collapsed.Add(1)
		} else { // evicted again meanwhile
			out[lateI[j]] = p.fetch(f, []uint64{idx})[0]
		}
	}
	return out
}

func (p *Proxy) fetchRun(f *File, idxs []uint64, fes []*fetch) {
	defer p.bg.Done()
	p.stats.Requests.Add(1)
	res, err := p.up.ReadBlocks(p.up.ctx, f.image, f.meta.Name, idxs[0], uint32(len(idxs)))
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
func (p *Proxy) accept(f *File, idx uint64, r blockproto.BlockResult) ([]byte, error) {
	want := f.Digest(idx)
	if want == nil {
		want = r.Digest // a disk: trust the server's digest, check transport
	}
	if err := blockproto.VerifyBlock(r, want); err != nil {
		return nil, fmt.Errorf("%s/%s: %w", f.image, f.meta.Name, err)
	}
	p.stats.FetchedBlocks.Add(1)
	if r.Zero {
		if f.disk != nil {
			// A disk has no zero map (its blocks change): cache the zeros,
			// or every read of them would go upstream again.
			if err := p.cache.Fill(f.key, idx, zeroBlock[:r.Length], nil); err != nil {
				p.log.Debug("block not cached", zap.String("file", f.key), zap.Uint64("block", idx), zap.Error(err))
			}
		}
		return nil, nil
	}
	p.stats.FetchedBytes.Add(uint64(len(r.Data)))
	// Verified above: no digest, so the cache does not hash it again.
	if err := p.cache.Fill(f.key, idx, r.Data, nil); err != nil {
		p.log.Debug("block not cached", zap.String("file", f.key), zap.Uint64("block", idx), zap.Error(err))
	}
	return r.Data, nil
}

// readAhead detects sequential readers and fetches ahead of them, doubling
// the window up to p.readAhead, so a long read costs bytes ÷ bandwidth
// rather than round trips.
//
// The kernel's own read-ahead sends several large reads of one stream at
// once and they arrive in any order, so a read counts as sequential when it
// starts near the furthest end read so far (within a few times its own
// length, up to the kernel's read-ahead window), not only exactly there.
// Any other read is a seek: the window and the read-ahead position start
// over.
func (f *File) readAhead(off, end int64) {
	if f.p.readAhead <= 0 {
		return
	}
	f.raMu.Lock()
	tol := min(4*(end-off), ReadAheadKB<<10)
	seq := f.lastEnd >= 0 && off >= f.lastEnd-tol && off <= f.lastEnd+tol
	if !seq {
		f.lastEnd, f.window, f.raNext = end, 0, 0
		f.raMu.Unlock()
		return
	}
	f.lastEnd = max(f.lastEnd, end)
	f.window = min(max(2*f.window, 1<<20), f.p.readAhead)
	bs := int64(f.blockSize())
	from := max(uint64((f.lastEnd+bs-1)/bs), f.raNext)
	to := min(uint64((f.lastEnd+int64(f.window)+bs-1)/bs), (f.meta.Size+uint64(bs)-1)/uint64(bs))
	if from >= to {
		f.raMu.Unlock()
		return
	}
	f.raNext = to
	f.raMu.Unlock()
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

// Prefetch fetches the given blocks of a file in the background (used with
// boot profiles).
func (f *File) Prefetch(idxs []uint64) {
	var want []uint64
	for _, idx := range idxs {
		if idx*f.blockSize() < f.meta.Size && !f.zero(idx) && !f.p.cache.Has(f.key, idx) {
			want = append(want, idx)
		}
	}
	f.p.stats.Prefetched.Add(uint64(len(want)))
	f.p.fetch(f, want)
}

// DropCaches empties the clean block cache, the file cache and the kernel
// page cache of every mounted view. Dirty blocks stay.
func (p *Proxy) DropCaches() (blocks, files int) {
	blocks = p.cache.DropClean()
	files = p.files.Drop()
	p.mu.Lock()
	roots := append([]*fs.Inode(nil), p.roots...)
	p.mu.Unlock()
	for _, r := range roots {
		dropPageCache(r)
	}
	return blocks, files
}

// Close unmounts every view, writes back dirty disks (best effort, bounded
// by ctx) and closes the caches.
func (p *Proxy) Close(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	servers := p.servers
	p.mu.Unlock()
	for _, s := range servers {
		if err := s.Unmount(); err != nil {
			p.log.Warn("unmount", zap.Error(err))
		}
	}
	p.mu.Lock()
	for _, d := range p.disks {
		d.stopTimer()
	}
	p.mu.Unlock()
	// The block cache must not be closed under a fill, and no fetch may
	// outlive the proxy.
	p.bg.Wait()
	p.files.Close()
	if _, err := p.FlushAll(ctx); err != nil {
		p.log.Warn("write-back at close failed; dirty blocks stay in the cache for the next start", zap.Error(err))
	}
	return p.cache.Close()
}
