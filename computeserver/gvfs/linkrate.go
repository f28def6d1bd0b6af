package gvfs

import (
	"sync"
	"time"
)

// linkRate measures the upstream's bandwidth from block reads: bytes
// received over the time at least one read was in flight (reads are
// pipelined, so one read's own time would count the others' bytes as
// waiting).
type linkRate struct {
	mu       sync.Mutex
	inflight int
	since    time.Time
	busy     time.Duration
	bytes    uint64
}

// minRateBytes is what must have arrived before the rate means anything
// (a few round trips' worth would measure the latency).
const minRateBytes = 4 << 20

func (r *linkRate) begin() {
	r.mu.Lock()
	if r.inflight == 0 {
		r.since = time.Now()
	}
	r.inflight++
	r.mu.Unlock()
}

func (r *linkRate) end(bytes int) {
	r.mu.Lock()
	r.inflight--
	r.bytes += uint64(bytes)
	if r.inflight == 0 {
		r.busy += time.Since(r.since)
	}
	r.mu.Unlock()
}

// Bandwidth is the upstream's measured bandwidth in bytes per second, 0
// while too little was read to tell.
func (u *Upstream) Bandwidth() float64 {
	r := &u.rate
	r.mu.Lock()
	defer r.mu.Unlock()
	busy := r.busy
	if r.inflight > 0 {
		busy += time.Since(r.since)
	}
	if r.bytes < minRateBytes || busy <= 0 {
		return 0
	}
	return float64(r.bytes) / busy.Seconds()
}
