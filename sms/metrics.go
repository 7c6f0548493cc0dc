package sms

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Results of a send, the values of m2mguard_sms_sends_total{result}.
const (
	ResultSent     = "sent"     // the gateway accepted the message (2xx)
	ResultRejected = "rejected" // an answer not worth a retry (4xx but 429): configuration, credentials, number
	ResultFailed   = "failed"   // retries used up, a Retry-After too long to wait, a transport error or the caller's deadline
)

// Metrics are the Prometheus collectors of HTTPSender. A nil *Metrics
// counts nothing.
type Metrics struct {
	sends    *prometheus.CounterVec
	duration prometheus.Histogram
	retries  prometheus.Counter
}

// NewMetrics registers the SMS collectors on r:
//
//	m2mguard_sms_sends_total{result}       sends by result (sent, rejected, failed)
//	m2mguard_sms_send_duration_seconds     duration of a send, its retries and waits included
//	m2mguard_sms_retries_total             attempts retried
//
// Every result is exported from the start (at 0), so that rates and alerts
// see the first failure.
func NewMetrics(r prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		sends: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_sms_sends_total", Help: "SMS sends through the gateway by result: sent, rejected (4xx), failed (retries used up, transport error, deadline).",
		}, []string{"result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "m2mguard_sms_send_duration_seconds", Help: "Duration of an SMS send, retries and their waits included.",
			Buckets: []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60},
		}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "m2mguard_sms_retries_total", Help: "SMS gateway attempts that failed and were retried.",
		}),
	}
	for _, r := range []string{ResultSent, ResultRejected, ResultFailed} {
		m.sends.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.sends, m.duration, m.retries} {
		if err := r.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *Metrics) observe(result string, d time.Duration) {
	if m == nil {
		return
	}
	m.sends.WithLabelValues(result).Inc()
	m.duration.Observe(d.Seconds())
}

func (m *Metrics) retried() {
	if m != nil {
		m.retries.Inc()
	}
}

// Sends returns the counter of one result (for tests and dashboards in code).
func (m *Metrics) Sends(result string) prometheus.Counter { return m.sends.WithLabelValues(result) }

// Retries returns the retries counter.
func (m *Metrics) Retries() prometheus.Counter { return m.retries }
