package shop

import "github.com/prometheus/client_golang/prometheus"

// metrics are the shop's own.
type metrics struct {
	placement prometheus.Histogram
	creates   *prometheus.CounterVec
	// Access streams (access.go), by kind: exec, console, port-forward.
	accessOpen  *prometheus.GaugeVec
	accessBytes *prometheus.CounterVec
	// Migrations off draining plants (drain.go), by result.
	drains *prometheus.CounterVec
}

func newMetrics() *metrics {
	return &metrics{
		placement: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "vmgrid", Subsystem: "shop", Name: "placement_seconds",
			Help: "Time from a request to its winning plant chosen.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		creates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "shop", Name: "creates_total", Help: "CreateVM outcomes.",
		}, []string{"result"}),
		accessOpen: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "vmgrid", Subsystem: "shop", Name: "access_streams_open",
			Help: "Open exec, console and port-forward streams relayed to plants.",
		}, []string{"kind"}),
		accessBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "shop", Name: "access_bytes_total",
			Help: "Bytes of access stream messages relayed, to the guest (in) and from it (out).",
		}, []string{"kind", "direction"}),
		drains: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vmgrid", Subsystem: "shop", Name: "drain_migrations_total",
			Help: "Live migrations of VMs off draining plants this shop drove: migrated, cannot_move (it cannot move live), no_room (no other plant can host it), failed.",
		}, []string{"result"}),
	}
}

// register registers every metric or none.
func (m *metrics) register(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	var done []prometheus.Collector
	for _, c := range []prometheus.Collector{m.placement, m.creates, m.accessOpen, m.accessBytes, m.drains} {
		if err := reg.Register(c); err != nil {
			for _, d := range done {
				reg.Unregister(d)
			}
			return err
		}
		done = append(done, c)
	}
	return nil
}
