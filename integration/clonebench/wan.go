package clonebench

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/Shopify/toxiproxy/v2/toxics"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// sharedBandwidthType is the toxic registered here (see the package doc).
const sharedBandwidthType = "shared_bandwidth"

func init() { toxics.Register(sharedBandwidthType, new(sharedBandwidth)) }

// WAN is an emulated wide-area link: a toxiproxy server whose proxies all
// add the same latency and share one bandwidth per direction.
type WAN struct {
	RTT time.Duration
	// BitsPerSecond of each direction; 0 is unlimited.
	BitsPerSecond float64

	srv      *toxiproxy.ApiServer
	up, down *link

	mu      sync.Mutex
	proxies []*toxiproxy.Proxy
}

// link is one direction of the WAN: a serialisation clock shared by every
// connection, and a byte counter.
type link struct {
	id          string
	bytesPerSec float64
	bytes       atomic.Uint64

	mu   sync.Mutex
	free time.Time // when the link has sent everything queued so far
}

// links lets toxics, which toxiproxy makes by reflection from JSON, find
// their link: the JSON names it.
var (
	links   sync.Map // id → *link
	linkSeq atomic.Uint64
)

func newLink(dir string, bytesPerSec float64) *link {
	l := &link{id: fmt.Sprintf("wan%d-%s", linkSeq.Add(1), dir), bytesPerSec: bytesPerSec}
	links.Store(l.id, l)
	return l
}

// send queues n bytes and returns when the last of them has left.
func (l *link) send(n int) time.Time {
	l.bytes.Add(uint64(n))
	if l.bytesPerSec <= 0 {
		return time.Time{}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	// The link's clock runs on from where it was, not from now: a sender
	// woken late by its timer must not lose the time it overslept. Only
	// after an idle spell longer than linkCredit does it restart from now.
	start := l.free
	if now := time.Now(); now.Sub(start) > linkCredit {
		start = now.Add(-linkCredit)
	}
	l.free = start.Add(time.Duration(float64(n) / l.bytesPerSec * float64(time.Second)))
	return l.free
}

// linkCredit is how far the link's clock may lag behind real time: enough
// to absorb timer overshoot (a chunk of 32 KiB takes 0.26 ms at 1 Gbit/s,
// a timer wakes up to a millisecond or two late), small enough not to
// matter next to a round trip.
const linkCredit = 2 * time.Millisecond

// NewWAN starts an emulated WAN (no proxy yet: see Expose).
func NewWAN(rtt time.Duration, bitsPerSecond float64) *WAN {
	return &WAN{
		RTT: rtt, BitsPerSecond: bitsPerSecond,
		srv:  toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop()),
		up:   newLink("up", bitsPerSecond/8),
		down: newLink("down", bitsPerSecond/8),
	}
}

// Expose returns a compute-side address whose connections reach target, on
// the image side, across the WAN.
func (w *WAN) Expose(name, target string) (string, error) {
	px := toxiproxy.NewProxy(w.srv, name, "127.0.0.1:0", target)
	if err := px.Start(); err != nil {
		return "", fmt.Errorf("toxiproxy %s: %w", name, err)
	}
	w.mu.Lock()
	w.proxies = append(w.proxies, px)
	w.mu.Unlock()
	// Latency before bandwidth: toxiproxy's latency toxic measures its
	// delay from when a chunk was read, so it must see the chunk first.
	half := strconv.FormatInt(w.RTT.Milliseconds()/2, 10)
	for _, d := range []struct {
		stream string
		l      *link
	}{{"upstream", w.up}, {"downstream", w.down}} {
		for _, spec := range []string{
			`{"name":"latency_` + d.stream + `","type":"latency","stream":"` + d.stream + `","attributes":{"latency":` + half + `}}`,
			`{"name":"bandwidth_` + d.stream + `","type":"` + sharedBandwidthType + `","stream":"` + d.stream + `","attributes":{"link":"` + d.l.id + `"}}`,
		} {
			if _, err := px.Toxics.AddToxicJson(strings.NewReader(spec)); err != nil {
				return "", fmt.Errorf("toxiproxy %s: toxic %s: %w", name, spec, err)
			}
		}
	}
	return px.Listen, nil
}

// Bytes is the payload that crossed so far, toward the image side (up) and
// toward the compute side (down).
func (w *WAN) Bytes() (up, down uint64) { return w.up.bytes.Load(), w.down.bytes.Load() }

// Close stops every proxy and its connections.
func (w *WAN) Close() {
	w.mu.Lock()
	pxs := w.proxies
	w.proxies = nil
	w.mu.Unlock()
	for _, px := range pxs {
		px.Stop()
	}
	links.Delete(w.up.id)
	links.Delete(w.down.id)
}

// sharedBandwidth is toxiproxy's bandwidth toxic with its clock on a link
// shared by all connections (toxiproxy's keeps one per connection).
type sharedBandwidth struct {
	Link string `json:"link"`
}

func (t *sharedBandwidth) Pipe(stub *toxics.ToxicStub) {
	var l *link
	if v, ok := links.Load(t.Link); ok {
		l = v.(*link)
	}
	var timer *time.Timer
	for {
		select {
		case <-stub.Interrupt:
			return
		case c := <-stub.Input:
			if c == nil {
				stub.Close()
				return
			}
			if l != nil {
				if d := time.Until(l.send(len(c.Data))); d > 0 {
					if timer == nil {
						timer = time.NewTimer(d)
					} else {
						timer.Reset(d)
					}
					select {
					case <-timer.C:
					case <-stub.Interrupt:
						stub.Output <- c // never drop data
						return
					}
				}
			}
			stub.Output <- c
		}
	}
}

// LinkUse is how a run used the WAN toward the compute side.
type LinkUse struct {
	// FirstByte and LastByte: when the first and the last byte crossed,
	// seconds into the run.
	FirstByte float64 `json:"first_byte_seconds"`
	LastByte  float64 `json:"last_byte_seconds"`
	// Busy is the time the bytes need at the full bandwidth; Utilization
	// is Busy over the run's time.
	Busy        float64 `json:"busy_seconds"`
	Utilization float64 `json:"utilization"`
	// Gaps are the spells of at least gapMin between the first and the
	// last byte when nothing crossed: [start, length] in seconds.
	Gaps [][2]float64 `json:"gaps,omitempty"`
	// Timeline is [seconds, bytes so far] every 100 ms.
	Timeline [][2]float64 `json:"timeline"`
}

const (
	traceEvery = 5 * time.Millisecond
	gapMin     = 30 * time.Millisecond
)

// trace samples the bytes crossing toward the compute side until the
// returned function is called; that returns the use of the link.
func (w *WAN) trace() func() *LinkUse {
	type point struct {
		t time.Duration
		b uint64
	}
	start := time.Now()
	_, b0 := w.Bytes()
	var pts []point
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(traceEvery)
		defer tick.Stop()
		for {
			_, b := w.Bytes()
			pts = append(pts, point{time.Since(start), b - b0})
			select {
			case <-done:
				return
			case <-tick.C:
			}
		}
	}()
	return func() *LinkUse {
		close(done)
		<-stopped
		total := time.Since(start)
		_, b := w.Bytes()
		pts = append(pts, point{total, b - b0})
		u := &LinkUse{}
		if bytes := pts[len(pts)-1].b; bytes > 0 && w.BitsPerSecond > 0 {
			u.Busy = float64(bytes) * 8 / w.BitsPerSecond
			u.Utilization = u.Busy / total.Seconds()
		}
		first, last := -1, -1
		for i := 1; i < len(pts); i++ {
			if pts[i].b > pts[i-1].b {
				if first < 0 {
					first = i - 1
				}
				last = i
			}
		}
		if first >= 0 {
			u.FirstByte, u.LastByte = pts[first].t.Seconds(), pts[last].t.Seconds()
			for i := first + 1; i <= last; {
				j := i
				for j <= last && pts[j].b == pts[i-1].b {
					j++
				}
				if j > i && pts[j-1].t-pts[i-1].t >= gapMin {
					u.Gaps = append(u.Gaps, [2]float64{pts[i-1].t.Seconds(), (pts[j-1].t - pts[i-1].t).Seconds()})
				}
				i = j + 1
			}
		}
		next := time.Duration(0)
		for _, p := range pts {
			if p.t >= next {
				u.Timeline = append(u.Timeline, [2]float64{p.t.Seconds(), float64(p.b)})
				next += 100 * time.Millisecond
			}
		}
		return u
	}
}
