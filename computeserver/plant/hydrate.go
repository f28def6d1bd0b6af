package plant

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
)

// DefaultHydrateAfter leaves a clone's first second to its own demand
// reads (the workload it was made for starts then) before the bulk of its
// RAM competes with them for the link.
const DefaultHydrateAfter = time.Second

// startHydration fetches what a lazily restored VM still reads from the
// upstream, its RAM file and then the golden disk under its redo log, in
// the background class (demand reads of every guest go first), and
// records in the classad how much of the RAM is local. When it is done the
// VM no longer needs the image server.
func (p *Plant) startHydration(v *vm, log *zap.Logger) {
	m := v.mem
	// The guest runs: a failed read of its RAM would kill it (SIGBUS), so
	// its reads wait for the upstream from now on, however long.
	ctx, cancel := context.WithCancel(context.Background())
	m.cancel, m.done, m.release = cancel, make(chan struct{}), m.ram.Hold()
	ready := time.Now()
	v.mu.Lock()
	v.ad.MemoryLocalBytes = m.ram.LocalBytes()
	v.mu.Unlock()
	after := p.cfg.HydrateAfter
	if after == 0 {
		after = DefaultHydrateAfter
	}
	go func() {
		defer close(m.done)
		defer cancel()
		select {
		case <-time.After(max(after, 0)):
		case <-ctx.Done():
			return
		}
		err := m.ram.Hydrate(ctx, gvfs.Background, func(local uint64) {
			v.mu.Lock()
			v.ad.MemoryLocalBytes = local
			v.mu.Unlock()
		})
		if err == nil && m.root != nil {
			err = m.root.Hydrate(ctx, gvfs.Background, nil)
		}
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("hydration stopped; the VM keeps reading from the upstream", zap.Error(err))
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
