// Package smsmetrics counts the sends of an sms.HTTPSender in Prometheus.
// It is apart from package sms so that sms, which the reference terminal
// links (for its SMS inbox), does not pull in the Prometheus client.
package smsmetrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/sms"
)

// Metrics are the Prometheus collectors of an sms.HTTPSender; set it as
// the sender's Observer.
type Metrics struct {
	sends    *prometheus.CounterVec
	duration prometheus.Histogram
	retries  prometheus.Counter
}

// New registers the SMS collectors on r:
//
//	m2mguard_sms_sends_total{result}       sends by result (sent, rejected, failed)
//	m2mguard_sms_send_duration_seconds     duration of a send, its retries and waits included
//	m2mguard_sms_retries_total             attempts retried
//
// Every result is exported from the start (at 0), so that rates and alerts
// see the first failure.
func New(r prometheus.Registerer) (*Metrics, error) {
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
	for _, r := range []string{sms.ResultSent, sms.ResultRejected, sms.ResultFailed} {
		m.sends.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.sends, m.duration, m.retries} {
		if err := r.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Sent counts a send by its result (sms.Result*) and observes its duration.
func (m *Metrics) Sent(result string, d time.Duration) {
	m.sends.WithLabelValues(result).Inc()
	m.duration.Observe(d.Seconds())
}

// Retried counts an attempt that failed and was retried.
func (m *Metrics) Retried() { m.retries.Inc() }

// Sends returns the counter of one result (for tests and dashboards in code).
func (m *Metrics) Sends(result string) prometheus.Counter { return m.sends.WithLabelValues(result) }

// Retries returns the retries counter.
func (m *Metrics) Retries() prometheus.Counter { return m.retries }
