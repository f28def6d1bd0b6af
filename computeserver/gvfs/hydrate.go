package gvfs

import (
	"context"
	"math"
	"sync"
	"time"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// forever is the retry window of reads that must not fail (patient).
const forever = time.Duration(math.MaxInt64 / 2)

// patient reports whether reads of the file must wait for the upstream
// however long it is away: a memory image mapped by a running lazily
// restored guest (Hold). A failed read of it is a SIGBUS in the VM
// monitor, the guest dead; waiting makes it a guest that stalls while the
// image server is away and runs on when it is back (a hard NFS mount
// without a limit). Before a guest runs (a clone being made) reads keep
// Config.UpstreamRetry, so a creation fails as Unavailable and can be
// tried elsewhere.
func (f *blockFile) patient() bool {
	return f.held.Load() > 0
}

// Hold makes reads of the file wait for an absent upstream without a
// limit until the returned func is called (holds count).
func (f *blockFile) Hold() func() {
	f.held.Add(1)
	var once sync.Once
	return func() { once.Do(func() { f.held.Add(-1) }) }
}

// memoryImage reports whether the file is a memory image read block by
// block (a RAM file): the proxy does not read ahead of its readers.
func (f *blockFile) memoryImage() bool {
	return f.meta.Kind == imagev1.FileKind_FILE_KIND_MEMORY_STATE && f.meta.Policy != imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE
}

// hydrateBatch is how many blocks Hydrate asks for at once, and
// hydrateWindow how many such batches it keeps asked for: the next batch
// is on the wire while the last one's blocks arrive (one batch at a time
// left the link idle for a round trip between batches: 43% busy on an
// eager copy across 40 ms / 100 Mbit). The class's in-flight bound
// (inFlight) paces them on the wire.
const (
	hydrateBatch  = 64
	hydrateWindow = 4
)

// Hydrate fetches every block of the file that is neither zero nor cached,
// in order, in class c (Background for hydration, Prefetch for an eager
// copy or a stream: demand reads of running guests go first, they have a
// connection of their own), and returns once all are local. progress, if
// set, is told the local bytes after each batch.
func (f *blockFile) Hydrate(ctx context.Context, c Class, progress func(local uint64)) error {
	n := (f.meta.Size + f.blockSize() - 1) / f.blockSize()
	var window [][]*fetch
	wait := func() error {
		fs := window[0]
		window = window[1:]
		for _, fe := range fs {
			if _, err := fe.wait(ctx); err != nil {
				return err
			}
		}
		f.p.stats.Hydrated.Add(uint64(len(fs)))
		if progress != nil {
			progress(f.LocalBytes())
		}
		return nil
	}
	for from := uint64(0); from < n; {
		var want []uint64
		for ; from < n && len(want) < hydrateBatch; from++ {
			if !f.zero(from) && !f.p.cache.Has(f.key, from) {
				want = append(want, from)
			}
		}
		window = append(window, f.p.fetchClass(f, want, c))
		if len(window) >= hydrateWindow {
			if err := wait(); err != nil {
				return err
			}
		}
	}
	for len(window) > 0 {
		if err := wait(); err != nil {
			return err
		}
	}
	return nil
}

// LocalBytes is how many bytes of the file need no upstream: zero blocks
// (by the meta-data) and blocks in the block cache.
func (f *blockFile) LocalBytes() uint64 {
	var local uint64
	n := (f.meta.Size + f.blockSize() - 1) / f.blockSize()
	for idx := uint64(0); idx < n; idx++ {
		if f.zero(idx) || f.p.cache.Has(f.key, idx) {
			local += f.blockLen(idx)
		}
	}
	return local
}
