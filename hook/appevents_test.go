package hook_test

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/events"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
)

// eventSink keeps the events the hook emits.
type eventSink struct {
	mu  sync.Mutex
	got []events.Event
}

func (s *eventSink) Emit(e events.Event) {
	s.mu.Lock()
	s.got = append(s.got, e)
	s.mu.Unlock()
}

func (s *eventSink) of(kind events.Kind) []events.Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []events.Event
	for _, e := range s.got {
		if e.Kind == kind {
			out = append(out, e)
		}
	}
	return out
}

// TestRefusalEventsOnlyForKnownTerminalsCapped: refused logins of unknown
// serial numbers give applications no event at all (an attacker would
// choose the topics), those of a known terminal give login_refused events
// up to Options.RefusalEventRate per second, the rest counted as
// suppressed; no event carries a secret the test handed out.
func TestRefusalEventsOnlyForKnownTerminalsCapped(t *testing.T) {
	const rate, unknownAttempts, knownAttempts = 5, 100, 40
	sink := &eventSink{}
	e := newEnv(t, func(o *hook.Options) {
		o.Events, o.RefusalEventRate = sink, rate
		o.Throttle = hook.ThrottleOptions{Free: 1000, Base: time.Hour} // every attempt reaches the check
	})
	term := e.register("A00MS8011390002S", codec.HS256)
	for i := range unknownAttempts {
		unknown := term
		unknown.sn = "NOBODY" + strings.Repeat("X", i%8)
		c, code := dialV5(t, e.addr, unknown.sn, unknown.username(), e.login(unknown, false), true)
		c.conn.Close()
		if code == 0 {
			t.Fatal("an unknown terminal got in")
		}
	}
	if got := len(sink.of(events.LoginRefused)); got != 0 {
		t.Fatalf("%d login_refused events for unknown serial numbers, want 0", got)
	}
	wrong := term
	wrong.up = "NotThePassword00"
	start := time.Now()
	for range knownAttempts {
		c, code := dialV5(t, e.addr, wrong.sn, wrong.username(), e.login(wrong, false), true)
		c.conn.Close()
		if code == 0 {
			t.Fatal("a wrong password got in")
		}
	}
	elapsed := time.Since(start)
	got := sink.of(events.LoginRefused)
	limit := rate + rate*int(elapsed/time.Second+1) // the burst, then rate per second begun
	if len(got) == 0 || len(got) > limit {
		t.Fatalf("%d login_refused events for %d refusals in %v, want 1 to %d", len(got), knownAttempts, elapsed, limit)
	}
	emitted := e.counter("m2mguard_events_total", "kind", "login_refused", "result", "emitted")
	suppressed := e.counter("m2mguard_events_total", "kind", "login_refused", "result", "suppressed")
	if int(emitted) != len(got) || int(emitted+suppressed) != knownAttempts {
		t.Fatalf("counted %v emitted and %v suppressed, want %d and %d", emitted, suppressed, len(got), knownAttempts-len(got))
	}
	for _, ev := range got {
		if ev.V != events.Version || ev.SN != term.sn || ev.Reason != "bad-digest" {
			t.Fatalf("event %+v", ev)
		}
	}

	// A genuine login and its end: connected, disconnected; nothing in any
	// event that the scan of secrets would find.
	c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), true)
	if code != 0 {
		t.Fatalf("genuine login refused: 0x%02x", code)
	}
	c.conn.Close()
	waitUntil := func(kind events.Kind) {
		t.Helper()
		if !testwait.Until(liveness, func() bool { return len(sink.of(kind)) == 1 }) {
			t.Fatalf("no %s event", kind)
		}
	}
	waitUntil(events.Connected)
	waitUntil(events.Disconnected)
	if r := sink.of(events.Disconnected)[0].Reason; r != "connection-lost" {
		t.Errorf("disconnected reason %q, want connection-lost", r)
	}
	sink.mu.Lock()
	var all strings.Builder
	for _, ev := range sink.got {
		all.Write(ev.Marshal())
	}
	sink.mu.Unlock()
	for _, s := range e.secrets {
		if strings.Contains(all.String(), string(s)) || strings.Contains(all.String(), fmtHex(s)) {
			t.Fatal("an event carries a secret")
		}
	}
}

// slowDeliveryRegistry is a store slower to record a delivery than the
// terminal is to answer it.
type slowDeliveryRegistry struct {
	hook.Registry
	delay time.Duration
}

func (r *slowDeliveryRegistry) MarkDelivered(ctx context.Context, sn string, rid codec.ID, mode codec.Mode) (*keysvc.Terminal, error) {
	time.Sleep(r.delay)
	return r.Registry.MarkDelivered(ctx, sn, rid, mode)
}

// TestChangeDeliveredBeforeCommitted: a change's delivery is recorded
// before its cfg goes out. A terminal that acknowledges at once, before a
// slow store has recorded the delivery, must not leave the delivery to be
// recorded after the commit (where it finds no change pending: a failure
// counted for a change that succeeded, and no change_delivered event, or
// one after change_committed). Applications see started, delivered,
// committed, in that order.
func TestChangeDeliveredBeforeCommitted(t *testing.T) {
	sink := &eventSink{}
	reg := &slowDeliveryRegistry{delay: 300 * time.Millisecond}
	e := newEnv(t, func(o *hook.Options) { o.Events = sink; reg.Registry, o.Registry = o.Registry, reg })
	term := e.register("A00MS8011390002S", codec.HS256)
	c, _ := loginWithKey(t, e, term, true)
	started := make(chan error, 1)
	go func() {
		_, err := e.hook.StartChange(context.Background(), term.sn, codec.WhatPwd)
		started <- err
	}()
	pk, err := c.nextPublish(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	rid, params, err := term.cfg(string(pk.Payload))
	if err != nil {
		t.Fatalf("cfg: %v", err)
	}
	next, err := term.applyParams(params)
	if err != nil {
		t.Fatal(err)
	}
	e.secrets = append(e.secrets, []byte(next.up), []byte(next.down))
	c.publish("$m2m/"+term.sn+"/ctl", term.ack(next, rid, false, e.ts(), nonce()), 1) // at once
	if f := keyMessage(t, c, next); f[1] != "done" {
		t.Fatalf("got %v, want done", f)
	}
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	var kinds []events.Kind
	testwait.Until(liveness, func() bool {
		kinds = nil
		sink.mu.Lock()
		for _, ev := range sink.got {
			if strings.HasPrefix(string(ev.Kind), "change_") {
				kinds = append(kinds, ev.Kind)
			}
		}
		sink.mu.Unlock()
		return len(kinds) >= 3
	})
	if want := []events.Kind{events.ChangeStarted, events.ChangeDelivered, events.ChangeCommitted}; !slices.Equal(kinds, want) {
		t.Fatalf("change events %v, want %v", kinds, want)
	}
	if n := e.counter("m2mguard_changes_total", "event", "failed"); n != 0 {
		t.Fatalf("%v changes counted as failed", n)
	}
}
