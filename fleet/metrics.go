package fleet

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the fleet's Prometheus series, registered on
// Options.Registerer (none when nil).
type metrics struct {
	claimSeconds  prometheus.Histogram
	claims        *prometheus.CounterVec
	available     prometheus.Gauge
	unavailable   prometheus.Counter
	reconnects    prometheus.Counter
	throttleSent  prometheus.Counter
	throttleDrop  prometheus.Counter
	throttleApply prometheus.Counter
	events        *prometheus.CounterVec
	leaseHeld     *prometheus.GaugeVec
}

func newMetrics(r prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		claimSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "m2mguard_fleet_claim_seconds",
			Help:    "Time of a replay claim on the fleet's JetStream bucket, retries included.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 2, 5},
		}),
		claims: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_fleet_claims_total",
			Help: "Replay claims by result: first (accepted), replay (claimed before), unavailable (JetStream did not answer: the message is refused).",
		}, []string{"result"}),
		available: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "m2mguard_fleet_available",
			Help: "1 while the fleet's JetStream answers, 0 while it does not (claims fail closed, the throttle is local).",
		}),
		unavailable: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "m2mguard_fleet_unavailable_total",
			Help: "Times the fleet's JetStream became unavailable to this broker.",
		}),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "m2mguard_fleet_reconnects_total",
			Help: "Reconnections to NATS.",
		}),
		throttleSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "m2mguard_fleet_throttle_sent_total",
			Help: "Login failures and successes this broker shared with the fleet.",
		}),
		throttleDrop: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "m2mguard_fleet_throttle_dropped_total",
			Help: "Login failures and successes not shared because the queue was full or NATS refused them.",
		}),
		throttleApply: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "m2mguard_fleet_throttle_applied_total",
			Help: "Login failures and successes of other brokers applied to this broker's throttle.",
		}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_fleet_events_total",
			Help: "Events between brokers by direction (published, received) and kind.",
		}, []string{"direction", "kind"}),
		leaseHeld: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "m2mguard_fleet_lease_held",
			Help: "1 while this broker holds the named fleet-wide lease.",
		}, []string{"lease"}),
	}
	for _, res := range []string{"first", "replay", "unavailable"} {
		m.claims.WithLabelValues(res)
	}
	if r == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.claimSeconds, m.claims, m.available, m.unavailable, m.reconnects,
		m.throttleSent, m.throttleDrop, m.throttleApply, m.events, m.leaseHeld} {
		if err := r.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
