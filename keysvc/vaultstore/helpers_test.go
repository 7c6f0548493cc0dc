package vaultstore_test

import (
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
)

// registries maps each Metrics to its registry, for counter.
var registries sync.Map // *testing.T -> *prometheus.Registry

func newRegistry(t *testing.T) *prometheus.Registry {
	r := prometheus.NewRegistry()
	registries.Store(t, r)
	return r
}

// counter returns the value of the series of name whose label values are
// labels (in the order of the metric's labels); -1 if there is none.
func counter(t *testing.T, _ *vaultstore.Metrics, name string, labels ...string) float64 {
	t.Helper()
	r, ok := registries.Load(t)
	if !ok {
		t.Fatal("no registry for this test")
	}
	mfs, err := r.(*prometheus.Registry).Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if labelValues(m) == strings.Join(labels, ",") {
				if c := m.GetCounter(); c != nil {
					return c.GetValue()
				}
				return m.GetGauge().GetValue()
			}
		}
	}
	return -1
}

func labelValues(m *dto.Metric) string {
	var vs []string
	for _, l := range m.GetLabel() {
		vs = append(vs, l.GetValue())
	}
	return strings.Join(vs, ",")
}

// testLogger logs at debug level into b, guarded by mu.
func testLogger(mu *sync.Mutex, b *strings.Builder) *slog.Logger {
	return slog.New(slog.NewTextHandler(lockedWriter{mu, b}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *strings.Builder
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}
