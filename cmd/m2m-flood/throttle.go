package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// throttleScenario: failed terminal logins with a fresh, well-formed serial
// number each time (unknown to the broker, with a well-formed token), as
// fast as the workers go, from one address. Every failure is a new (sn,
// address) for the login throttle to remember; the figure is whether the
// broker refuses as fast at the end as at the start.
var throttleScenario = &scenario{
	name: "throttle",
	title: func(c *Config) string {
		until := "for " + c.Seconds.String()
		if c.Failures > 0 {
			until = fmt.Sprintf("until %d refusals (at most %s)", c.Failures, c.ThrottleLimit)
		}
		return fmt.Sprintf("failed terminal logins with fresh serial numbers, %d workers from %s %s; the genuine terminal logs in from %s every %s",
			c.ThrottleWorkers, c.Attacker, until, c.Genuine, c.GenuineInterval)
	},
	genuine: true,
	attack:  throttleAttack,
}

// bucket is the resolution of the refusal-rate timeline.
const bucket = 100 * time.Millisecond

type throttleDetail struct {
	Workers   int               `json:"workers"`
	Target    int64             `json:"target_refusals,omitempty"` // --failures
	Reached   bool              `json:"target_reached,omitempty"`
	Attempts  int64             `json:"attempts"`
	Refusals  int64             `json:"refusals"` // CONNACK with a failure code, or closed without one
	Outcomes  map[string]int64  `json:"outcomes"`
	Errors    map[string]string `json:"first_errors,omitempty"` // the first error behind each outcome that had one
	Window    float64           `json:"window_seconds"`         // length of the first and the last window
	FirstRate float64           `json:"first_rate"`             // refusals/s in the first window
	LastRate  float64           `json:"last_rate"`              // refusals/s in the last window
	Ratio     float64           `json:"last_first_ratio"`       // LastRate / FirstRate
	PerSecond []int64           `json:"refusals_per_second"`
}

func throttleAttack(ctx context.Context, e *env) (detail, error) {
	limit := e.cfg.Seconds
	if e.cfg.Failures > 0 {
		limit = e.cfg.ThrottleLimit
	}
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	var t tally
	var next atomic.Int64
	buckets := make([]atomic.Int64, int(limit/bucket)+1)
	start := time.Now()
	var wg sync.WaitGroup
	for range e.cfg.ThrottleWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !ended(ctx) {
				term := newTerminal(fmt.Sprintf("F%015d", next.Add(1)))
				pk, err := term.connect(60)
				if err != nil {
					t.add("error", err) // cannot happen: the identity is well-formed
					return
				}
				outcome, _, err := attempt(ctx, e.attackDialer, e.b.TCP, pk, e.cfg.LoginTimeout)
				if outcome == "" {
					return
				}
				refused := t.add(outcome, err)
				if refusal(outcome) {
					if i := int(time.Since(start) / bucket); i < len(buckets) {
						buckets[i].Add(1)
					}
				}
				if e.cfg.Failures > 0 && refused >= e.cfg.Failures {
					cancel()
				}
			}
		}()
	}
	stopProgress := startProgress(ctx, e, 5*time.Second, func() string {
		n, refused, _ := t.counts()
		return fmt.Sprintf("%d attempts, %d refused (%.0f/s)", n, refused, float64(refused)/time.Since(start).Seconds())
	})
	wg.Wait()
	stopProgress()
	elapsed := time.Since(start)
	d := &throttleDetail{Workers: e.cfg.ThrottleWorkers, Target: e.cfg.Failures}
	d.Attempts, d.Refusals, d.Outcomes = t.counts()
	d.Errors = t.errors()
	d.Reached = d.Target > 0 && d.Refusals >= d.Target
	counts := make([]int64, min(int(elapsed/bucket), len(buckets))) // whole buckets only
	for i := range counts {
		counts[i] = buckets[i].Load()
	}
	d.Window, d.FirstRate, d.LastRate = windowRates(counts, bucket, 5*time.Second)
	if d.FirstRate > 0 {
		d.Ratio = d.LastRate / d.FirstRate
	}
	for i, n := range counts {
		if i%int(time.Second/bucket) == 0 {
			d.PerSecond = append(d.PerSecond, 0)
		}
		d.PerSecond[len(d.PerSecond)-1] += n
	}
	return d, nil
}

// windowRates returns the rate per second of the first and of the last
// window of counts (one per bucket), the window being want or half the
// timeline if that is shorter.
func windowRates(counts []int64, bucket, want time.Duration) (window, first, last float64) {
	n := min(int(want/bucket), len(counts)/2)
	if n == 0 {
		return 0, 0, 0
	}
	var a, b int64
	for i := range n {
		a += counts[i]
		b += counts[len(counts)-n+i]
	}
	w := (time.Duration(n) * bucket).Seconds()
	return w, float64(a) / w, float64(b) / w
}

func (d *throttleDetail) rows() []row {
	rs := []row{
		{"attempts", fmt.Sprintf("%d from %d workers; %d refused", d.Attempts, d.Workers, d.Refusals)},
		{"outcomes", outcomesText(d.Outcomes)},
		{"first errors", errorsText(d.Errors)},
	}
	if d.Target > 0 {
		rs = append(rs, row{"target refusals", fmt.Sprintf("%d: reached %v", d.Target, d.Reached)})
	}
	rs = append(rs, row{"refusal rate", fmt.Sprintf("first %.0f s: %.0f/s, last %.0f s: %.0f/s, last/first %.3f", d.Window, d.FirstRate, d.Window, d.LastRate, d.Ratio)})
	return rs
}

func (d *throttleDetail) checks(r *Result) []Check {
	return []Check{{What: "refusal rate, last window / first window", Value: fmt.Sprintf("%.3f", d.Ratio), Target: ">= 0.8", Met: d.Ratio >= 0.8}}
}
