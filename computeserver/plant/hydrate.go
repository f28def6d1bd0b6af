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

// fetchRest starts fetching what a lazily restored VM still reads from the
// upstream, its RAM file and then the golden disk under its redo log: the
// RAM in class c after a wait of after, the disk in the background class
// (demand reads of every guest go first). It keeps the classad's count of
// local RAM bytes. A clone whose image has no working-set profile streams
// its RAM this way from the restore on (auto); the others start at ready
// (startHydration).
func (m *lazyMem) fetchRest(v *vm, c gvfs.Class, after time.Duration) {
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
		err := m.ram.Hydrate(ctx, c, func(local uint64) {
			v.mu.Lock()
			v.ad.MemoryLocalBytes = local
			v.mu.Unlock()
		})
		if err == nil && m.root != nil {
			err = m.root.Hydrate(ctx, gvfs.Background, nil)
		}
		m.err = err
	}()
}

// startHydration makes a ready lazily restored VM's RAM reads wait for the
// upstream however long it is away, starts fetching the rest of its RAM
// and disk (after --hydrate-after) unless that runs already, and records
// in the classad when it is done: from then on the VM no longer needs the
// image server.
func (p *Plant) startHydration(v *vm, log *zap.Logger) {
	m := v.mem
	// The guest runs: a failed read of its RAM would kill it (SIGBUS), so
	// its reads wait for the upstream from now on, however long.
	m.release = m.ram.Hold()
	ready := time.Now()
	v.mu.Lock()
	v.ad.MemoryLocalBytes = m.ram.LocalBytes()
	v.mu.Unlock()
	if m.done != nil {
		select {
		case <-m.done:
			if m.err != nil { // the stream gave up (the upstream away): again, patiently
				m.done = nil
			}
		default:
		}
	}
	if m.done == nil {
		after := p.cfg.HydrateAfter
		if after == 0 {
			after = DefaultHydrateAfter
		}
		m.fetchRest(v, gvfs.Background, after)
	}
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
