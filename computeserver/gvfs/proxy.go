package gvfs

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

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

// A View shows the proxy's files to a reader that keeps their content
// itself (the kernel's page cache behind the FUSE view). The proxy tells its
// views when what they keep is no longer good, and closes them first when
// it closes; it knows nothing else of them.
type View interface {
	// Invalidate drops what the view keeps of a file's content; an empty
	// image or file stands for every one.
	Invalidate(image, file string)
	// Close ends the view (unmounts it).
	Close() error
}

// Proxy is the client-side GVFS proxy: it answers reads of image files from
// zero-block meta-data, the disk block cache or the file cache, and fetches
// the rest from its upstream, collapsing concurrent misses and reading ahead
// of sequential readers. Writes to persistent disks stay in the cache as
// dirty blocks until a flush writes them back.
type Proxy struct {
	up    *Upstream
	cache blockCache
	files *FileCache
	log   *zap.Logger
	dir   string
	cfg   Config // with defaults
	stats Stats
	// ctx bounds upstream fetches and their retries; Close cancels it.
	ctx    context.Context
	cancel context.CancelFunc

	mu        sync.Mutex
	manifests map[string]*manifestEntry
	open      map[[2]string]File
	inflight  map[blockKey]*fetch
	views     []View
	disks     map[string]*diskState
	closed    bool
	bg        sync.WaitGroup // upstream fetches in flight
	// Working-set profiles (profile.go): recordings and prefetch runs by
	// image, and the class of each file's first upstream request.
	recordings           map[string][]*Recording
	runs                 map[string][]*ProfileRun
	recording, profiling atomic.Int32
	first                map[[2]string]Class
	flushHist            prometheus.Histogram
}

// Stats counts what the proxy did (all fields atomic).
type Stats struct {
	Hits, Misses, ZeroBlocks, Collapsed     atomic.Uint64
	FetchedBlocks, FetchedBytes, Prefetched atomic.Uint64
	// Requests counts ReadBlocks requests sent upstream (each one a round
	// trip, pipelined with the others on one stream).
	Requests, Hydrated atomic.Uint64
	// Profile prefetch: blocks fetched, of those read by the clone, and
	// reads the profile did not predict.
	ProfileFetched, ProfileUsed, ProfileMissed atomic.Uint64
	// ClassRequests splits Requests by class (Demand, Prefetch, Background).
	ClassRequests          [numClasses]atomic.Uint64
	Flushes, FlushedBlocks atomic.Uint64
	FlushNanos             atomic.Int64
}

type manifestEntry struct {
	m       *imagev1.Manifest
	fetched time.Time
}

// New opens the caches in cfg.Dir and returns a proxy over cfg.Upstream.
// Dirty blocks left by a previous run are kept; call FlushAll to write them
// back (the compute server does so at start).
func New(cfg Config) (*Proxy, error) {
	cfg = cfg.withDefaults()
	cache, err := openBlockCache(filepath.Join(cfg.Dir, "blocks"), cfg.Cache, cfg.Logger)
	if err != nil {
		return nil, err
	}
	files, err := newFileCache(filepath.Join(cfg.Dir, "files"), cfg.Upstream, cfg.UpstreamRetry, cfg.Logger)
	if err != nil {
		cache.Close()
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, "disks"), 0o755); err != nil {
		cache.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Proxy{
		up: cfg.Upstream, cache: cache, files: files, log: cfg.Logger, dir: cfg.Dir, cfg: cfg,
		ctx: ctx, cancel: cancel,
		manifests: map[string]*manifestEntry{}, open: map[[2]string]File{},
		inflight: map[blockKey]*fetch{}, disks: map[string]*diskState{},
		recordings: map[string][]*Recording{}, runs: map[string][]*ProfileRun{}, first: map[[2]string]Class{},
		flushHist: newFlushHistogram(),
	}, nil
}

// Stats returns the proxy's counters.
func (p *Proxy) Stats() *Stats { return &p.stats }

// Upstream is the tier this proxy reads from.
func (p *Proxy) Upstream() *Upstream { return p.up }

// FileCache is the whole-file cache.
func (p *Proxy) FileCache() *FileCache { return p.files }

// GoldenRecheck is how long a golden manifest is used before it is asked
// again (Config.GoldenRecheck): views keep golden entries as long.
func (p *Proxy) GoldenRecheck() time.Duration { return p.cfg.GoldenRecheck }

// AddView registers a view of the proxy's files: it is told of content it
// must drop, and closed when the proxy closes.
func (p *Proxy) AddView(v View) {
	p.mu.Lock()
	p.views = append(p.views, v)
	p.mu.Unlock()
}

// Image returns the FULL manifest of an image or disk. Golden manifests are
// rechecked after Config.GoldenRecheck, disk manifests after DiskRecheck;
// while the upstream is unavailable the last answer holds.
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
		m, err = p.fetchManifest(ctx, name, e == nil)
	}
	if err != nil {
		return p.imageFailed(name, e, err)
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

// fetchManifest asks the upstream for a full manifest. With nothing known
// of the name (a clone's first look at its golden image) it waits for an
// upstream that is away, as reads do (Config.UpstreamRetry); with a
// manifest known, that one holds meanwhile (imageFailed).
func (p *Proxy) fetchManifest(ctx context.Context, name string, wait bool) (*imagev1.Manifest, error) {
	if !wait {
		return p.up.Manifest(ctx, name)
	}
	var m *imagev1.Manifest
	err := p.up.retry(ctx, p.cfg.UpstreamRetry, func() (err error) {
		m, err = p.up.Manifest(ctx, name)
		return err
	})
	return m, err
}

// imageFailed answers a manifest the upstream could not give: what we knew
// while it is away, nothing (and forget it) once it says the name is gone.
func (p *Proxy) imageFailed(name string, e *manifestEntry, err error) (*imagev1.Manifest, error) {
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
		return DiskRecheck
	}
	return p.cfg.GoldenRecheck
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

// Open resolves an image's file. A golden file is opened anew when its
// image was published again; a disk's file is one for the proxy's life.
func (p *Proxy) Open(ctx context.Context, image, file string) (File, error) {
	m, err := p.Image(ctx, image)
	if err != nil {
		return nil, err
	}
	meta, err := fileOf(m, file)
	if err != nil {
		return nil, err
	}
	k := [2]string{image, file}
	p.mu.Lock()
	f := p.open[k]
	if f == nil || (!f.Writable() && f.Meta() != meta) {
		f = p.newFileLocked(m, image, meta)
		p.open[k] = f
	}
	p.mu.Unlock()
	if d, ok := f.(*diskFile); ok {
		// Every open of a disk, not only the first, checks whether another
		// plant wrote it (session consistency). Outside p.mu: dropping
		// stale blocks scans the cache.
		d.disk.observe(m.Generation, p)
	}
	return f, nil
}

func (p *Proxy) newFileLocked(m *imagev1.Manifest, image string, meta *imagev1.FileMeta) File {
	b := &blockFile{p: p, image: image, meta: meta, created: time.Unix(0, m.CreatedUnixNano), ra: readAheadState{lastEnd: -1}}
	if m.Writable {
		return newDiskFile(b, p.diskLocked(image))
	}
	return newGoldenFile(b)
}

func fileOf(m *imagev1.Manifest, name string) (*imagev1.FileMeta, error) {
	for _, f := range m.Files {
		if f.Name == name {
			return f, nil
		}
	}
	return nil, fmt.Errorf("image %q has no file %q: %w", m.Name, name, errdefs.ErrNotFound)
}

// Forget drops what the proxy knows of an image or disk (a cache proxy
// does, after it forwarded its deletion or a write-back).
func (p *Proxy) Forget(name string) {
	p.mu.Lock()
	delete(p.manifests, name)
	for k := range p.open {
		if k[0] == name {
			delete(p.open, k)
		}
	}
	p.mu.Unlock()
	p.cache.Invalidate(diskKey(name))
}

// DropCaches empties the clean block cache, the file cache and what every
// view keeps (the kernel page cache). Dirty blocks stay.
func (p *Proxy) DropCaches() (blocks, files int) {
	blocks = p.cache.DropClean()
	files = p.files.Drop()
	for _, v := range p.viewList() {
		v.Invalidate("", "")
	}
	return blocks, files
}

func (p *Proxy) viewList() []View {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]View(nil), p.views...)
}

// Close closes every view, writes back dirty disks (best effort, bounded
// by ctx) and closes the caches.
func (p *Proxy) Close(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	views := p.views
	p.mu.Unlock()
	for _, v := range views {
		if err := v.Close(); err != nil {
			p.log.Warn("close view", zap.Error(err))
		}
	}
	p.mu.Lock()
	for _, d := range p.disks {
		d.stopTimer()
	}
	p.mu.Unlock()
	// The block cache must not be closed under a fill, and no fetch may
	// outlive the proxy (nor wait out an upstream that is away).
	p.cancel()
	p.bg.Wait()
	p.files.Close()
	if _, err := p.FlushAll(ctx); err != nil {
		p.log.Warn("write-back at close failed; dirty blocks stay in the cache for the next start", zap.Error(err))
	}
	return p.cache.Close()
}

// List returns the upstream's catalog.
func (p *Proxy) List(ctx context.Context) ([]*imagev1.Manifest, error) { return p.up.List(ctx) }
