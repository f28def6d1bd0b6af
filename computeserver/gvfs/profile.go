package gvfs

import (
	"context"
	"slices"
	"sync"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Working-set profiles (GVFS §6's future work, after REAP): a recording is
// the blocks of an image's block-policy files that readers asked for, in
// the order of their first read; a later cold clone prefetches them in
// that order, pipelined, while the VM monitor restores. A profile run
// counts how many of its blocks were then read (used) and how many reads
// it did not predict (missed), so the plant can tell a profile that no
// longer predicts and record it again.

// Recording is a working-set recording of one image.
type Recording struct {
	p     *Proxy
	image string

	mu      sync.Mutex
	seen    map[blockKey]bool
	entries []*imagev1.ProfileEntry
	run     *ProfileRun // the prefetch of the same clone, to count misses
}

// Record starts recording the blocks readers read of image's files, until
// Stop. run, if set, is the profile prefetch of the same clone: reads of
// blocks it did not fetch count as its misses.
func (p *Proxy) Record(image string, run *ProfileRun) *Recording {
	r := &Recording{p: p, image: image, seen: map[blockKey]bool{}, run: run}
	p.mu.Lock()
	p.recordings[image] = append(p.recordings[image], r)
	p.recording.Add(1)
	p.mu.Unlock()
	return r
}

// Stop ends the recording and returns the blocks in the order they were
// first read.
func (r *Recording) Stop() []*imagev1.ProfileEntry {
	p := r.p
	p.mu.Lock()
	if removeFrom(p.recordings, r.image, r) {
		p.recording.Add(-1)
	}
	p.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.entries
}

// observe is a reader's read of blocks [from, to] of f (not zero blocks:
// they cost nothing to read).
func (f *blockFile) observe(from, to uint64) {
	p := f.p
	if p.recording.Load() == 0 && p.profiling.Load() == 0 {
		return
	}
	p.mu.Lock()
	rs := append([]*Recording(nil), p.recordings[f.image]...)
	runs := append([]*ProfileRun(nil), p.runs[f.image]...)
	p.mu.Unlock()
	for idx := from; idx <= to; idx++ {
		if f.zero(idx) {
			continue
		}
		k := blockKey{f.meta.Name, idx}
		for _, run := range runs {
			run.used(k)
		}
		for _, r := range rs {
			r.add(k)
		}
	}
}

// Attach makes run the prefetch whose misses the recording counts (a
// profile that arrived after the recording started).
func (r *Recording) Attach(run *ProfileRun) {
	r.mu.Lock()
	r.run = run
	r.mu.Unlock()
}

func (r *Recording) add(k blockKey) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen[k] {
		return
	}
	r.seen[k] = true
	r.entries = append(r.entries, &imagev1.ProfileEntry{File: k.file, Block: k.block})
	if r.run != nil && !r.run.has(k) {
		r.run.missed()
	}
}

// ProfileRun is the prefetch of one profile for one clone.
type ProfileRun struct {
	p      *Proxy
	image  string
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	want    map[blockKey]bool // in the profile
	pending map[blockKey]bool // fetched (or in the cache) and not read yet
	stats   ProfileStats
}

// ProfileStats is how well a profile predicted a clone's reads.
type ProfileStats struct {
	// Entries in the profile; Fetched of them came from the upstream
	// (the others were cached already); Used were read by the clone.
	Entries, Fetched, Used int
	// Missed counts blocks the clone read that the profile does not hold
	// (while a recording ran alongside).
	Missed int
}

// HitRate is used ÷ fetched (1 when nothing was fetched).
func (s ProfileStats) HitRate() float64 {
	if s.Fetched == 0 {
		return 1
	}
	return float64(s.Used) / float64(s.Fetched)
}

// profileWindow is how many prefetch batches of a profile are in flight at
// once: enough to keep a long link busy, few enough that the profile's
// order holds (each batch is one request of up to bulkRunBytes).
const profileWindow = 16

// Prefetch fetches a profile's blocks of image in the profile's order, in
// the prefetch class, pipelined, in the background; Stop ends it.
func (p *Proxy) Prefetch(image string, entries []*imagev1.ProfileEntry) *ProfileRun {
	ctx, cancel := context.WithCancel(p.ctx)
	run := &ProfileRun{p: p, image: image, cancel: cancel, done: make(chan struct{}),
		want: map[blockKey]bool{}, pending: map[blockKey]bool{}}
	for _, e := range entries {
		run.want[blockKey{e.File, e.Block}] = true
	}
	run.stats.Entries = len(run.want)
	p.mu.Lock()
	p.runs[image] = append(p.runs[image], run)
	p.profiling.Add(1)
	p.mu.Unlock()
	go run.fetchAll(ctx, entries)
	return run
}

// fetchAll walks the profile in batches of consecutive entries of one
// file, at most profileWindow batches in flight.
func (run *ProfileRun) fetchAll(ctx context.Context, entries []*imagev1.ProfileEntry) {
	defer close(run.done)
	files := map[string]File{}
	var inflight [][]*fetch
	for i := 0; i < len(entries) && ctx.Err() == nil; {
		j := i + 1
		for j < len(entries) && j-i < 16 && entries[j].File == entries[i].File {
			j++
		}
		f := files[entries[i].File]
		if f == nil {
			var err error
			if f, err = run.p.Open(ctx, run.image, entries[i].File); err != nil {
				i = j
				continue
			}
			files[entries[i].File] = f
		}
		if b := blockOf(f); b != nil {
			inflight = append(inflight, run.batch(b, entries[i:j]))
		}
		if len(inflight) >= profileWindow {
			waitAll(ctx, inflight[0])
			inflight = inflight[1:]
		}
		i = j
	}
	for _, fs := range inflight {
		waitAll(ctx, fs)
	}
}

func blockOf(f File) *blockFile {
	switch f := f.(type) {
	case *goldenFile:
		return f.blockFile
	case *diskFile:
		return f.blockFile
	}
	return nil
}

// batch asks for the blocks of es (sorted, so consecutive ones go as one
// request) that are not zero and not cached.
func (run *ProfileRun) batch(f *blockFile, es []*imagev1.ProfileEntry) []*fetch {
	var want []uint64
	run.mu.Lock()
	for _, e := range es {
		k := blockKey{e.File, e.Block}
		if e.Block*f.blockSize() >= f.meta.Size || f.zero(e.Block) {
			continue
		}
		run.pending[k] = true
		if !f.p.cache.Has(f.key, e.Block) {
			want = append(want, e.Block)
		}
	}
	run.stats.Fetched += len(want)
	run.mu.Unlock()
	f.p.stats.Prefetched.Add(uint64(len(want)))
	f.p.stats.ProfileFetched.Add(uint64(len(want)))
	return f.p.fetchClass(f, sortedUnique(want), Prefetch)
}

func waitAll(ctx context.Context, fs []*fetch) {
	for _, fe := range fs {
		fe.wait(ctx)
	}
}

func (run *ProfileRun) used(k blockKey) {
	run.mu.Lock()
	defer run.mu.Unlock()
	if run.pending[k] {
		delete(run.pending, k)
		run.stats.Used++
		run.p.stats.ProfileUsed.Add(1)
	}
}

func (run *ProfileRun) has(k blockKey) bool {
	run.mu.Lock()
	defer run.mu.Unlock()
	return run.want[k]
}

func (run *ProfileRun) missed() {
	run.mu.Lock()
	run.stats.Missed++
	run.mu.Unlock()
	run.p.stats.ProfileMissed.Add(1)
}

// Stop ends the prefetch and returns how well the profile predicted.
func (run *ProfileRun) Stop() ProfileStats {
	run.cancel()
	<-run.done
	p := run.p
	p.mu.Lock()
	if removeFrom(p.runs, run.image, run) {
		p.profiling.Add(-1)
	}
	p.mu.Unlock()
	run.mu.Lock()
	defer run.mu.Unlock()
	return run.stats
}

// sortedUnique sorts a batch: profiles list blocks in read order, and
// consecutive blocks of a batch go out as one request.
func sortedUnique(xs []uint64) []uint64 {
	slices.Sort(xs)
	return slices.Compact(xs)
}

// FirstRequestClass is the class of the first upstream request for a file
// of an image since the proxy started (ok false: none yet): a clone that
// prefetched its profile asked for its RAM file first in Prefetch.
func (p *Proxy) FirstRequestClass(image, file string) (c Class, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok = p.first[[2]string{image, file}]
	return c, ok
}

func (p *Proxy) noteRequest(f *blockFile, c Class) {
	k := [2]string{f.image, f.meta.Name}
	p.mu.Lock()
	if _, ok := p.first[k]; !ok {
		p.first[k] = c
	}
	p.mu.Unlock()
}

// removeFrom removes x from m[key] (deleting an empty list) and reports
// whether it was there.
func removeFrom[T comparable](m map[string][]T, key string, x T) bool {
	i := slices.Index(m[key], x)
	if i < 0 {
		return false
	}
	m[key] = slices.Delete(m[key], i, i+1)
	if len(m[key]) == 0 {
		delete(m, key)
	}
	return true
}
