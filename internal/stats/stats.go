// Package stats summarises measurements for the project's load tools
// (cmd/m2m-bench, cmd/m2m-flood): latency percentiles, medians and ratios
// that stay valid JSON (never NaN).
package stats

import (
	"math"
	"sort"
	"time"
)

// Latency summarises a set of latencies in milliseconds.
type Latency struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50_ms"`
	P95  float64 `json:"p95_ms"`
	P99  float64 `json:"p99_ms"`
	Max  float64 `json:"max_ms"`
	Mean float64 `json:"mean_ms"`
}

// Percentile returns the p-th percentile (0 < p <= 100) of sorted by the
// nearest-rank method; 0 for an empty slice.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	if rank < 1 {
		rank = 1
	}
	if rank > len(sorted) {
		rank = len(sorted)
	}
	return sorted[rank-1]
}

// MS returns d in milliseconds.
func MS(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// Summarize sorts ds in place and returns its summary; the zero Latency for
// none.
func Summarize(ds []time.Duration) Latency {
	if len(ds) == 0 {
		return Latency{}
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return Latency{
		N:    len(ds),
		P50:  MS(Percentile(ds, 50)),
		P95:  MS(Percentile(ds, 95)),
		P99:  MS(Percentile(ds, 99)),
		Max:  MS(ds[len(ds)-1]),
		Mean: MS(sum / time.Duration(len(ds))),
	}
}

// Median returns the median of xs (the mean of the two middle values for an
// even count); 0 for none (JSON has no NaN). xs is not modified.
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// Ratio returns a/b, or 0 when b is 0 (JSON has no NaN).
func Ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}
