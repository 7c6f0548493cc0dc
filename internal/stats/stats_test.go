package stats

import (
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	ds := func(ms ...int) []time.Duration {
		out := make([]time.Duration, len(ms))
		for i, m := range ms {
			out[i] = time.Duration(m) * time.Millisecond
		}
		return out
	}
	hundred := make([]int, 100)
	for i := range hundred {
		hundred[i] = i + 1
	}
	tests := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 50, 0},
		{"one", ds(7), 99, 7 * time.Millisecond},
		{"p50 of 1..100", ds(hundred...), 50, 50 * time.Millisecond},
		{"p95 of 1..100", ds(hundred...), 95, 95 * time.Millisecond},
		{"p99 of 1..100", ds(hundred...), 99, 99 * time.Millisecond},
		{"p100 of 1..100", ds(hundred...), 100, 100 * time.Millisecond},
		{"p50 of 4 (nearest rank)", ds(1, 2, 3, 4), 50, 2 * time.Millisecond},
		{"p99 of 4", ds(1, 2, 3, 4), 99, 4 * time.Millisecond},
		{"tiny p rounds up to the first", ds(1, 2, 3), 0.001, time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Percentile(tt.sorted, tt.p); got != tt.want {
				t.Errorf("Percentile(%v, %v) = %v, want %v", tt.sorted, tt.p, got, tt.want)
			}
		})
	}
}

func TestSummarize(t *testing.T) {
	got := Summarize([]time.Duration{3 * time.Millisecond, time.Millisecond, 2 * time.Millisecond})
	want := Latency{N: 3, P50: 2, P95: 3, P99: 3, Max: 3, Mean: 2}
	if got != want {
		t.Errorf("Summarize = %+v, want %+v", got, want)
	}
	if (Summarize(nil) != Latency{}) {
		t.Error("Summarize(nil) is not zero")
	}
}

func TestMedianAndRatio(t *testing.T) {
	tests := []struct {
		xs   []float64
		want float64
	}{
		{[]float64{5}, 5},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
	}
	for _, tt := range tests {
		in := append([]float64(nil), tt.xs...)
		if got := Median(tt.xs); got != tt.want {
			t.Errorf("Median(%v) = %v, want %v", tt.xs, got, tt.want)
		}
		for i := range in {
			if in[i] != tt.xs[i] {
				t.Errorf("Median modified its input")
			}
		}
	}
	if Median(nil) != 0 || Ratio(1, 0) != 0 || Ratio(1, 4) != 0.25 {
		t.Error("Median(nil) or ratio wrong")
	}
}
