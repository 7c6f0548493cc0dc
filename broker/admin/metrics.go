package admin

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// unmatched is the route label of a request that matched no pattern
// (net/http answered it itself: a redirect to a cleaned path, "*").
const unmatched = "unmatched"

// requestMetrics count and time the API's requests.
type requestMetrics struct {
	requests *prometheus.CounterVec   // by route and status
	duration *prometheus.HistogramVec // by route
}

func newRequestMetrics(reg prometheus.Registerer) (*requestMetrics, error) {
	m := &requestMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "m2mguard_admin_requests_total",
			Help: `Admin API requests, by route (the pattern the request matched, e.g. "GET /v1/terminals/{sn}"; "/" for unknown endpoints) and HTTP status.`},
			[]string{"route", "status"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "m2mguard_admin_request_duration_seconds",
			Help: "Time to answer an admin API request, by route (an import: its whole stream).", Buckets: prometheus.DefBuckets},
			[]string{"route"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.duration} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// instrument counts and times every request next serves. The route label
// is the pattern the request matched if it is one of routes, the patterns
// registered, else "unmatched": never a value taken from the request, so
// that no client can create label values (net/http sets r.Pattern from the
// request's own path for some redirects).
func (m *requestMetrics) instrument(routes map[string]bool, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w}
		next.ServeHTTP(rec, r)
		route := r.Pattern // set by the mux on this very request
		if !routes[route] {
			route = unmatched
		}
		m.requests.WithLabelValues(route, strconv.Itoa(rec.status())).Inc()
		m.duration.WithLabelValues(route).Observe(time.Since(start).Seconds())
	})
}

// statusRecorder remembers the status a handler answered with.
// http.ResponseController reaches the writer below through Unwrap (the
// import's streaming flushes).
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.code == 0 && code >= 200 {
		s.code = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.code == 0 {
		s.code = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// status is the answer's status; 200 if the handler wrote nothing.
func (s *statusRecorder) status() int {
	if s.code == 0 {
		return http.StatusOK
	}
	return s.code
}
