package main

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/m2mguard/m2mguard/internal/stats"
)

// appScenario: application logins (a ClientID that is no serial number)
// with a fresh user name and a random password each time, from many
// workers on one address. Every such login costs the broker a password
// hash verification, for unknown names too.
var appScenario = &scenario{
	name: "app",
	title: func(c *Config) string {
		return fmt.Sprintf("application logins, fresh name and random password each (ClientID x-<n>), %d workers from %s for %s; the genuine terminal logs in from %s every %s",
			c.AppWorkers, c.Attacker, c.Seconds, c.Genuine, c.GenuineInterval)
	},
	genuine: true,
	attack:  appAttack,
}

type appDetail struct {
	Workers  int               `json:"workers"`
	Attempts int64             `json:"attempts"`
	PerSec   float64           `json:"attempts_per_sec"`
	Outcomes map[string]int64  `json:"outcomes"`
	Errors   map[string]string `json:"first_errors,omitempty"` // the first error behind each outcome that had one
	Answer   stats.Latency     `json:"answer"`                 // CONNECT to CONNACK of the attackers' attempts that got one
}

func appAttack(ctx context.Context, e *env) (detail, error) {
	ctx, cancel := context.WithTimeout(ctx, e.cfg.Seconds)
	defer cancel()
	var t tally
	var next atomic.Int64
	answers := make([][]time.Duration, e.cfg.AppWorkers)
	start := time.Now()
	var wg sync.WaitGroup
	for w := range e.cfg.AppWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !ended(ctx) {
				n := strconv.FormatInt(next.Add(1), 10)
				// The ClientID is the claimed application's own (name-1),
				// so that the login reaches the password check: a foreign
				// ClientID is refused before it.
				pk := connectPacket("flood-"+n+"-1", "flood-"+n, randomPassword(), 60)
				outcome, took, err := attempt(ctx, e.attackDialer, e.b.TCP, pk, 30*time.Second)
				if outcome == "" {
					return
				}
				t.add(outcome, err)
				if outcome != "dial" && outcome != "closed" && outcome != "timeout" {
					answers[w] = append(answers[w], took)
				}
			}
		}()
	}
	stopProgress := startProgress(ctx, e, 5*time.Second, func() string {
		n, _, _ := t.counts()
		return fmt.Sprintf("%d attempts", n)
	})
	wg.Wait()
	stopProgress()
	d := &appDetail{Workers: e.cfg.AppWorkers}
	d.Attempts, _, d.Outcomes = t.counts()
	d.Errors = t.errors()
	d.PerSec = float64(d.Attempts) / time.Since(start).Seconds()
	var all []time.Duration
	for _, a := range answers {
		all = append(all, a...)
	}
	d.Answer = stats.Summarize(all)
	return d, nil
}

func (d *appDetail) rows() []row {
	return []row{
		{"attempts", fmt.Sprintf("%d (%.0f/s) from %d workers", d.Attempts, d.PerSec, d.Workers)},
		{"outcomes", outcomesText(d.Outcomes)},
		{"first errors", errorsText(d.Errors)},
		{"broker's answer to an attacker", fmt.Sprintf("p50 %.1f ms, p99 %.1f ms, max %.1f ms (%d CONNACKs)", d.Answer.P50, d.Answer.P99, d.Answer.Max, d.Answer.N)},
	}
}

func (d *appDetail) checks(r *Result) []Check {
	return []Check{
		{What: "broker RSS growth (peak - before)", Value: fmt.Sprintf("%.1f MiB", r.RSS.Growth()), Target: "< 256 MiB", Met: r.RSS.Growth() < 256},
		genuineCheck(r.Genuine),
	}
}
