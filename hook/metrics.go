package hook

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/keysvc"
)

// metrics are the hook's Prometheus collectors, all prefixed m2mguard_.
type metrics struct {
	logins           *prometheus.CounterVec   // result, reason
	binding          *prometheus.CounterVec   // changed
	replays          *prometheus.CounterVec   // kind: login, envelope, control
	throttled        prometheus.Counter       //
	keysIssued       prometheus.Counter       //
	envelopeFailures *prometheus.CounterVec   // direction, reason
	storeLatency     *prometheus.HistogramVec // op
	sessions         *prometheus.GaugeVec     // kind
	changes          *prometheus.CounterVec   // event, detail
	appEvents        *prometheus.CounterVec   // kind, result: events for applications (appevents.go)

	// Children resolved once for the per-login path: WithLabelValues
	// hashes and locks on every call.
	accepted      prometheus.Counter            // logins{result="accepted"}
	lookupLatency prometheus.Observer           // store_latency{op="lookup"}
	terminals     prometheus.Gauge              // sessions{kind="terminal"}
	applications  prometheus.Gauge              // sessions{kind="application"}
	refused       map[string]prometheus.Counter // logins{result="refused"} by reason; read-only once built
}

// refusalReasons are the reason labels of refused logins.
var refusalReasons = []string{
	reasonMalformed, reasonUnknown, reasonBinding, reasonAlg, reasonSkew, reasonReplay, reasonDigest,
	reasonThrottled, reasonExpired, reasonDisabled, reasonUnavailable, reasonGuardDown, reasonBadApp,
	reasonAnonymous, reasonForeignID, reasonBusy,
}

// refusedFor is the counter of logins refused for reason.
func (m *metrics) refusedFor(reason string) prometheus.Counter {
	if c, ok := m.refused[reason]; ok {
		return c
	}
	return m.logins.WithLabelValues("refused", reason)
}

// sessionsOf is the sessions gauge of one kind of client.
func (m *metrics) sessionsOf(k clientKind) prometheus.Gauge {
	if k == kindTerminal {
		return m.terminals
	}
	return m.applications
}

// cacheStatser is implemented by registries with a read cache
// (*keysvc.Service); the hook then exports its hit ratio.
type cacheStatser interface {
	CacheStats() keysvc.CacheStats
}

func hitRatio(c cacheStatser) func() float64 {
	return func() float64 {
		st := c.CacheStats()
		total := st.Hits + st.Misses + st.Stale + st.FailClosed
		if total == 0 {
			return 0
		}
		return float64(st.Hits) / float64(total)
	}
}

func newMetrics(r prometheus.Registerer, reg Registry) (*metrics, error) {
	m := &metrics{
		logins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_logins_total", Help: "CONNECT attempts by result and refusal reason.",
		}, []string{"result", "reason"}),
		binding: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_binding_events_total", Help: "Logins whose IMEI or IMSI differ from the stored binding, by what changed.",
		}, []string{"changed"}),
		replays: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_replays_total", Help: "Replayed logins, envelopes and control messages.",
		}, []string{"kind"}),
		throttled: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "m2mguard_throttled_total", Help: "Logins refused because their identity and address are throttled.",
		}),
		keysIssued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "m2mguard_session_keys_issued_total", Help: "Session keys issued.",
		}),
		envelopeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_envelope_failures_total", Help: "Data envelopes dropped, by direction and reason.",
		}, []string{"direction", "reason"}),
		storeLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "m2mguard_store_latency_seconds", Help: "Key service calls made by the hook.",
			Buckets: []float64{1e-6, 1e-5, 1e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1, 2},
		}, []string{"op"}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_changes_total",
			Help: "Credential changes by event (started, delivered, committed, expired, refused, failed) and detail (origin, mode, by, reason or step).",
		}, []string{"event", "detail"}),
		appEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_events_total",
			Help: "Presence and security events for applications (docs/EVENTS.md) by kind and result: emitted (handed to the event queue) or suppressed (over events.refusal_rate).",
		}, []string{"kind", "result"}),
		sessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "m2mguard_sessions", Help: "Authenticated connections by kind.",
		}, []string{"kind"}),
	}
	m.accepted = m.logins.WithLabelValues("accepted", "")
	m.refused = make(map[string]prometheus.Counter, len(refusalReasons))
	for _, r := range refusalReasons {
		m.refused[r] = m.logins.WithLabelValues("refused", r)
	}
	m.lookupLatency = m.storeLatency.WithLabelValues("lookup")
	m.terminals = m.sessions.WithLabelValues(kindTerminal.String())
	m.applications = m.sessions.WithLabelValues(kindApp.String())
	cs := []prometheus.Collector{m.logins, m.binding, m.replays, m.throttled, m.keysIssued, m.envelopeFailures, m.storeLatency, m.sessions, m.changes, m.appEvents}
	if c, ok := reg.(cacheStatser); ok {
		cs = append(cs, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "m2mguard_cache_hit_ratio", Help: "Share of terminal lookups served fresh from the key service cache.",
		}, hitRatio(c)))
	}
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
