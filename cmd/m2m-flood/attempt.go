package main

import (
	"context"
	"maps"
	"net"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// tally counts the outcomes of login attempts (outcomeOf); safe for
// concurrent use.
type tally struct {
	mu       sync.Mutex
	m        map[string]int64
	firstErr map[string]string // the first error of each outcome that had one
	attempts int64
	refused  int64
}

// add counts one outcome (err: the error behind it, if any) and returns
// the refusals so far.
func (t *tally) add(outcome string, err error) int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m, t.firstErr = map[string]int64{}, map[string]string{}
	}
	t.m[outcome]++
	if _, seen := t.firstErr[outcome]; err != nil && !seen {
		t.firstErr[outcome] = err.Error()
	}
	t.attempts++
	if refusal(outcome) {
		t.refused++
	}
	return t.refused
}

// errors returns the first error of each outcome that had one.
func (t *tally) errors() map[string]string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.firstErr) == 0 {
		return nil
	}
	return maps.Clone(t.firstErr)
}

// counts returns the attempts, the refusals and a copy of the outcomes.
func (t *tally) counts() (attempts, refused int64, outcomes map[string]int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.attempts, t.refused, maps.Clone(t.m)
}

// attempt connects from d, sends pk, waits up to timeout for the CONNACK
// and resets the connection (the attacker keeps no TIME_WAIT). It returns
// the outcome, how long the broker took to answer the CONNECT and the
// error behind an outcome that is no CONNACK; outcome "" if ctx ended first
// (the attempt does not count).
func attempt(ctx context.Context, d *net.Dialer, addr string, pk packets.Packet, timeout time.Duration) (string, time.Duration, error) {
	c, err := dialMQTT(ctx, d, addr)
	if err != nil {
		if ended(ctx) {
			return "", 0, nil
		}
		return "dial", 0, err
	}
	stop := context.AfterFunc(ctx, func() { c.conn.Close() })
	defer stop()
	start := time.Now()
	code, err := c.connect(pk, timeout)
	took := time.Since(start)
	c.abort()
	if ended(ctx) {
		return "", 0, nil
	}
	return outcomeOf(code, err), took, err
}

// ended reports whether ctx is done or past its deadline: a dial or a
// read whose deadline is the context's fails a moment before the context
// itself says so, and must not count as the broker's doing.
func ended(ctx context.Context) bool {
	if ctx.Err() != nil {
		return true
	}
	d, ok := ctx.Deadline()
	return ok && !time.Now().Before(d)
}
