package vaultstore

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/keysvc"
)

// Metrics are the Prometheus collectors of a Store: its logins, the renewals
// of its token, the token's remaining TTL and its failed requests. A nil
// *Metrics records nothing. One Metrics serves one Store.
type Metrics struct {
	logins   *prometheus.CounterVec // method, result
	renewals *prometheus.CounterVec // result
	failures *prometheus.CounterVec // kind
	expires  atomic.Int64           // unix nanoseconds; 0 = the token never expires, or no login yet
	ttl      *prometheus.Desc
}

// Results of logins and renewals, the values of their result label.
const (
	ResultSuccess = "success"
	ResultFailure = "failure"
)

// NewMetrics registers the Vault collectors on r:
//
//	m2mguard_vault_logins_total{method,result}     logins (token check, approle, kubernetes): success, failure
//	m2mguard_vault_token_renewals_total{result}    renewals of the token: success, failure
//	m2mguard_vault_token_ttl_seconds               seconds until the token expires (absent for a token that never does)
//	m2mguard_vault_request_failures_total{kind}    Vault requests failed: unavailable (unreachable, sealed, timed out), forbidden
//
// Every method, result and kind is exported from the start (at 0).
func NewMetrics(r prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		logins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_vault_logins_total", Help: "Logins to Vault by method (token: the check of a given token) and result.",
		}, []string{"method", "result"}),
		renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_vault_token_renewals_total", Help: "Renewals of the broker's Vault token by result.",
		}, []string{"result"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_vault_request_failures_total", Help: "Vault requests that failed, by kind: unavailable (unreachable, sealed, timed out) or forbidden (token or credentials refused).",
		}, []string{"kind"}),
		ttl: prometheus.NewDesc("m2mguard_vault_token_ttl_seconds", "Seconds until the broker's Vault token expires; absent for a token that never does.", nil, nil),
	}
	for _, method := range []string{MethodToken, MethodAppRole, MethodKubernetes} {
		for _, result := range []string{ResultSuccess, ResultFailure} {
			m.logins.WithLabelValues(method, result)
		}
	}
	for _, result := range []string{ResultSuccess, ResultFailure} {
		m.renewals.WithLabelValues(result)
	}
	for _, kind := range []string{"unavailable", "forbidden"} {
		m.failures.WithLabelValues(kind)
	}
	for _, c := range []prometheus.Collector{m.logins, m.renewals, m.failures, ttlCollector{m}} {
		if err := r.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// ttlCollector exports the remaining TTL, computed when scraped.
type ttlCollector struct{ m *Metrics }

func (c ttlCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.m.ttl }

func (c ttlCollector) Collect(ch chan<- prometheus.Metric) {
	ns := c.m.expires.Load()
	if ns == 0 {
		return
	}
	left := max(time.Until(time.Unix(0, ns)).Seconds(), 0)
	ch <- prometheus.MustNewConstMetric(c.m.ttl, prometheus.GaugeValue, left)
}

func result(ok bool) string {
	if ok {
		return ResultSuccess
	}
	return ResultFailure
}

func (m *Metrics) loggedIn(method string, ok bool) {
	if m != nil {
		m.logins.WithLabelValues(method, result(ok)).Inc()
	}
}

func (m *Metrics) renewed(ok bool) {
	if m != nil {
		m.renewals.WithLabelValues(result(ok)).Inc()
	}
}

func (m *Metrics) setExpiry(ns int64) {
	if m != nil {
		m.expires.Store(ns)
	}
}

// requestFailed counts a failed request of an operational kind; not found,
// conflicts and invalid input are answers, not failures.
func (m *Metrics) requestFailed(kind error) {
	if m == nil {
		return
	}
	switch {
	case errors.Is(kind, keysvc.ErrUnavailable):
		m.failures.WithLabelValues("unavailable").Inc()
	case errors.Is(kind, keysvc.ErrForbidden):
		m.failures.WithLabelValues("forbidden").Inc()
	}
}
