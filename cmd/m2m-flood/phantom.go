package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
)

// phantomScenario: valid logins of many terminals, each connection reset
// (SO_LINGER 0) right after its CONNECT is written, before the CONNACK can
// be read. Afterwards the broker must list no session for any of them.
var phantomScenario = &scenario{
	name: "phantom",
	title: func(c *Config) string {
		return fmt.Sprintf("%d valid CONNECTs of as many terminals from %s, each connection reset right after the CONNECT is written; then GET /v1/sessions",
			c.Phantoms, c.Attacker)
	},
	setup:  phantomSetup,
	attack: phantomAttack,
}

// phantomSN names the i-th terminal of the phantom scenario.
func phantomSN(i int) string { return fmt.Sprintf("PHANTOM%07d", i) }

func phantomSetup(ctx context.Context, e *env) error {
	ts := make([]*terminal, e.cfg.Phantoms)
	for i := range ts {
		ts[i] = newTerminal(phantomSN(i))
	}
	if err := e.admin.importTerminals(ctx, ts); err != nil {
		return err
	}
	e.terminals = ts
	return nil
}

type phantomDetail struct {
	Attempts     int      `json:"attempts"`
	Reset        int64    `json:"reset"`    // CONNECT written, then reset
	Failed       int64    `json:"failed"`   // could not connect or write
	Sessions     int      `json:"sessions"` // listed by GET /v1/sessions once the count is steady
	Phantoms     int      `json:"phantoms"` // of them, the scenario's terminals
	SteadyAfter  float64  `json:"steady_after_seconds"`
	Gauge        *float64 `json:"sessions_gauge,omitempty"` // m2mguard_sessions{kind="terminal"}, if /metrics answered
	SessionsErr  string   `json:"sessions_error,omitempty"`
	FirstFailure string   `json:"first_failure,omitempty"`
}

func phantomAttack(ctx context.Context, e *env) (detail, error) {
	ts := e.terminals
	d := &phantomDetail{Attempts: len(ts)}
	var next atomic.Int64
	var reset, failed atomic.Int64
	var firstFailure sync.Once
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= len(ts) {
					return
				}
				err := connectAndReset(ctx, e, ts[i])
				if err != nil {
					failed.Add(1)
					firstFailure.Do(func() { d.FirstFailure = err.Error() })
					continue
				}
				reset.Add(1)
			}
		}()
	}
	wg.Wait()
	d.Reset, d.Failed = reset.Load(), failed.Load()
	e.progress("%d CONNECTs written and reset, %d failed; waiting for the session count to hold still", d.Reset, d.Failed)

	// The broker handles the last CONNECTs after the resets: poll the
	// sessions until the count has held for a second.
	start := time.Now()
	var ss []adminapi.Session
	var err error
	last, since := -1, time.Now()
	for time.Since(start) < 15*time.Second && ctx.Err() == nil {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ss, err = e.admin.sessions(cctx)
		cancel()
		if err != nil {
			break
		}
		if len(ss) != last {
			last, since = len(ss), time.Now()
		} else if time.Since(since) >= time.Second {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	d.SteadyAfter = time.Since(start).Seconds()
	if err != nil {
		d.SessionsErr = err.Error()
	}
	d.Sessions = len(ss)
	for _, s := range ss {
		if strings.HasPrefix(s.SN, "PHANTOM") {
			d.Phantoms++
		}
	}
	mctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if v, ok := e.admin.metric(mctx, `m2mguard_sessions{kind="terminal"}`); ok {
		d.Gauge = &v
	}
	return d, nil
}

// connectAndReset writes a valid CONNECT of t and resets the connection
// at once.
func connectAndReset(ctx context.Context, e *env, t *terminal) error {
	pk, err := t.connect(60)
	if err != nil {
		return err
	}
	c, err := dialMQTT(ctx, e.attackDialer, e.b.TCP)
	if err != nil {
		return err
	}
	err = c.write(pk, 5*time.Second)
	c.abort()
	return err
}

func (d *phantomDetail) rows() []row {
	rs := []row{
		{"CONNECTs", fmt.Sprintf("%d attempted, %d written and reset, %d failed", d.Attempts, d.Reset, d.Failed)},
		{"sessions listed afterwards", fmt.Sprintf("%d, of them %d of the reset logins (count steady after %.1f s)", d.Sessions, d.Phantoms, d.SteadyAfter)},
	}
	if d.Gauge != nil {
		rs = append(rs, row{`m2mguard_sessions{kind="terminal"}`, fmt.Sprint(*d.Gauge)})
	}
	if d.SessionsErr != "" {
		rs = append(rs, row{"sessions error", d.SessionsErr})
	}
	if d.FirstFailure != "" {
		rs = append(rs, row{"first failure", d.FirstFailure})
	}
	return rs
}

func (d *phantomDetail) checks(*Result) []Check {
	return []Check{{What: "phantom sessions (reset logins still listed)", Value: fmt.Sprint(d.Phantoms), Target: "0",
		Met: d.Phantoms == 0 && d.SessionsErr == "" && d.Reset > 0}}
}
