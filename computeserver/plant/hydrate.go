package plant

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
)

// DefaultHydrateAfter leaves a clone's first second to its own demand
// reads (the workload it was made for starts then) before the bulk of its
// RAM competes with them for the link.
const DefaultHydrateAfter = time.Second

// fetchRest starts fetching what a lazily restored VM still reads from
// the upstream, its RAM file and then the golden disk under its redo log,
// in the background class after a wait of after (demand reads of every
// guest go first), keeping the classad's count of local RAM bytes.
func (m *lazyMem) fetchRest(v *vm, after time.Duration) {
	ctx, cancel := context.WithCancel(context.Background())
	m.cancel, m.done = cancel, make(chan struct{})
	go func() {
		defer close(m.done)
		select {
		case <-time.After(max(after, 0)):
		case <-ctx.Done():
			m.err = ctx.Err()
			return
		}
		err := m.ram.Hydrate(ctx, gvfs.Background, m.progress(v))
		if err == nil && m.root != nil {
			err = m.root.Hydrate(ctx, gvfs.Background, nil)
		}
		m.err = err
	}()
}

// streamRAM fetches the whole RAM file from the restore on, in file order,
// in the prefetch class (auto, for an image without a working-set
// profile): the guest's faults go ahead of it on the demand connection.
// The disk waits for the hydration after ready.
func (m *lazyMem) streamRAM(v *vm) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	m.stopStream = func() { cancel(); <-done }
	go func() {
		defer close(done)
		_ = m.ram.Hydrate(ctx, gvfs.Prefetch, m.progress(v)) // what it did not fetch, the hydration does
	}()
}

func (m *lazyMem) progress(v *vm) func(uint64) {
	return func(local uint64) {
		v.mu.Lock()
		v.ad.MemoryLocalBytes = local
		v.mu.Unlock()
	}
}

// startHydration makes a ready lazily restored VM's RAM reads wait for the
// upstream however long it is away, starts fetching the rest of its RAM
// and disk (after --hydrate-after), and records in the classad when it is
// done: from then on the VM no longer needs the image server.
func (p *Plant) startHydration(v *vm, log *zap.Logger) {
	m := v.mem
	// The guest runs: a failed read of its RAM would kill it (SIGBUS), so
	// its reads wait for the upstream from now on, however long.
	m.release = m.ram.Hold()
	ready := time.Now()
	v.mu.Lock()
	v.ad.MemoryLocalBytes = m.ram.LocalBytes()
	v.mu.Unlock()
	after := p.cfg.HydrateAfter
	if after == 0 {
		after = DefaultHydrateAfter
	}
	// A stream still running goes on: the hydration's walk skips what it
	// fetched and joins what it has asked for.
	m.fetchRest(v, after)
	go func() {
		<-m.done
		if m.err != nil {
			if !errors.Is(m.err, context.Canceled) {
				log.Warn("hydration stopped; the VM keeps reading from the upstream", zap.Error(m.err))
			}
			return
		}
		took := time.Since(ready)
		v.mu.Lock()
		v.ad.MemoryLocalBytes, v.ad.HydratedNanos = m.ram.LocalBytes(), int64(max(took, 1))
		v.mu.Unlock()
		p.persist(v)
		log.Info("VM hydrated: it no longer needs the image server", zap.Duration("after_ready", took))
	}()
}
