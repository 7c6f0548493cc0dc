package hook_test

import (
	"net"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
)

func TestTerminalACL(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	a := e.register("TERMA", codec.HS256)
	e.register("TERMB", codec.HS256)
	c, code := dialV5(t, e.addr, a.sn, a.username(), e.login(a, false), true)
	if code != 0 {
		t.Fatalf("login: 0x%02x", code)
	}
	subs := []struct {
		filter string
		ok     bool
	}{
		{"$m2m/TERMA/key", true},
		{"m2m/TERMA/down/#", true},
		{"m2m/TERMA/down/+", true},
		{"m2m/TERMA/down/cmd", true},
		{"m2m/TERMB/down/#", false},
		{"$m2m/TERMB/key", false},
		{"$m2m/+/key", false},
		{"m2m/+/down/#", false},
		{"m2m/TERMA/#", false},
		{"m2m/TERMA/up/#", false},
		{"#", false},
		{"+/TERMA/down/x", false},
		{"$m2m/TERMA/ctl", false},
	}
	for _, s := range subs {
		rc := c.subscribe(s.filter, 0)
		if (rc < 0x80) != s.ok {
			t.Errorf("terminal subscribe %q: 0x%02x, want allowed=%v", s.filter, rc, s.ok)
		}
	}
	pubs := []struct {
		topic string
		ok    bool
	}{
		{"m2m/TERMA/up/temp", true},
		{"$m2m/TERMA/ctl", true},
		{"m2m/TERMB/up/temp", false},
		{"m2m/TERMA/down/cmd", false},
		{"$m2m/TERMA/key", false},
		{"$m2m/TERMB/ctl", false},
		{"other/topic", false},
	}
	for _, p := range pubs {
		rc := c.publish(p.topic, []byte("x"), 1)
		if (rc < 0x80) != p.ok {
			t.Errorf("terminal publish %q: 0x%02x, want allowed=%v", p.topic, rc, p.ok)
		}
	}
}

// TestApplicationACL: the default reach, wildcard filters refused beyond it,
// and $m2m topics out of reach whatever the filter.
func TestApplicationACL(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.register("TERMA", codec.HS256)
	pw := e.addApp("dash")
	app, code := dialV5(t, e.addr, "dash-1", "dash", pw, true)
	if code != 0 {
		t.Fatalf("login: 0x%02x", code)
	}
	subs := []struct {
		filter string
		ok     bool
	}{
		{"m2m/+/up/#", true},
		{"m2m/TERMA/up/temp", true},
		{"#", false},
		{"+/+/+/#", false},
		{"m2m/#", false},
		{"m2m/+/down/#", false},
		{"$m2m/+/key", false},
		{"$m2m/TERMA/key", false},
		{"$m2m/#", false},
	}
	for _, s := range subs {
		rc := app.subscribe(s.filter, 0)
		if (rc < 0x80) != s.ok {
			t.Errorf("application subscribe %q: 0x%02x, want allowed=%v", s.filter, rc, s.ok)
		}
	}
	pubs := []struct {
		topic string
		ok    bool
	}{
		{"m2m/TERMA/down/cmd", true},
		{"m2m/TERMA/up/temp", false},
		{"$m2m/TERMA/key", false},
		{"$m2m/TERMA/ctl", false},
	}
	for _, p := range pubs {
		rc := app.publish(p.topic, []byte("x"), 1)
		if (rc < 0x80) != p.ok {
			t.Errorf("application publish %q: 0x%02x, want allowed=%v", p.topic, rc, p.ok)
		}
	}
}

// TestKeyTrafficNeverReachesApplications: an application subscribed as
// widely as it may gets terminal data, never key-topic messages.
func TestKeyTrafficNeverReachesApplications(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("TERMA", codec.HS256)
	pw := e.addApp("dash")
	app, _ := dialV5(t, e.addr, "dash-1", "dash", pw, true)
	app.subscribe("m2m/+/up/#", 0)
	loginWithKey(t, e, term, true)
	if pk, err := app.nextPublish(300 * time.Millisecond); err == nil {
		t.Fatalf("application received %q", pk.TopicName)
	}
}

// TestRetainedStaysWithItsTerminal: a retained downlink for one terminal is
// not delivered to another terminal subscribing later.
func TestRetainedStaysWithItsTerminal(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	a := e.register("TERMA", codec.HS256)
	b := e.register("TERMB", codec.HS256)
	pw := e.addApp("dash")
	app, _ := dialV5(t, e.addr, "dash-1", "dash", pw, true)
	retained(t, app, "m2m/TERMA/down/config", []byte("for-A"))

	cb, _ := dialV5(t, e.addr, b.sn, b.username(), e.login(b, false), true)
	cb.subscribe("m2m/TERMB/down/#", 1)
	if pk, err := cb.nextPublish(300 * time.Millisecond); err == nil {
		t.Fatalf("terminal B received %q", pk.TopicName)
	}
	ca, _ := dialV5(t, e.addr, a.sn, a.username(), e.login(a, false), true)
	ca.subscribe("m2m/TERMA/down/#", 1)
	if pk, err := ca.nextPublish(5 * time.Second); err != nil || string(pk.Payload) != "for-A" {
		t.Fatalf("terminal A: %q %v", pk.Payload, err)
	}
}

// TestWillToForbiddenTopic: a will on another terminal's topic is never
// published (mochi does not run the ACL on wills).
func TestWillToForbiddenTopic(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	a := e.register("TERMA", codec.HS256)
	e.register("TERMB", codec.HS256)
	pw := e.addApp("dash")
	app, _ := dialV5(t, e.addr, "dash-1", "dash", pw, true)
	app.subscribe("m2m/+/up/#", 0)

	c, code := dialV5Via(t, net.Dialer{}, e.addr, a.sn, a.username(), e.login(a, false), true,
		will{topic: "m2m/TERMB/up/alarm", payload: []byte("forged")})
	if code != 0 {
		t.Fatalf("login: 0x%02x", code)
	}
	c.conn.Close() // an ungraceful close sends the will
	if pk, err := app.nextPublish(500 * time.Millisecond); err == nil {
		t.Fatalf("forbidden will delivered on %q", pk.TopicName)
	}
	// A will on the terminal's own uplink is allowed.
	c2, _ := dialV5Via(t, net.Dialer{}, e.addr, a.sn, a.username(), e.login(a, false), true,
		will{topic: "m2m/TERMA/up/status", payload: []byte("offline")})
	c2.conn.Close()
	if pk, err := app.nextPublish(5 * time.Second); err != nil || string(pk.Payload) != "offline" {
		t.Fatalf("own will: %q %v", pk.Payload, err)
	}
}
