package hook_test

import (
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
)

// TestExpiredInsideGrace: a login after up expired but inside the grace
// period succeeds, and a change of the passwords is started at once.
func TestExpiredInsideGrace(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	e.clock.advance(passwordLifetime + 24*time.Hour)
	if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true); code != 0 {
		t.Fatalf("login inside the grace period: 0x%02x", code)
	}
	rec, err := e.svc.Get(t.Context(), term.sn)
	if err != nil || rec.Pending == nil || rec.Pending.What != codec.WhatPwd || rec.Pending.Origin != keysvc.OriginExpiry {
		t.Fatalf("no password change started (%v)", err)
	}
}

// TestBasicKeyExpired: bkd matches but bk has expired: err bk-expired.
func TestBasicKeyExpired(t *testing.T) {
	t.Parallel()
	e := newEnvWith(t, func(o *keysvc.Options) { o.KeyLifetime = time.Hour }, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	e.clock.advance(2 * time.Hour)
	c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), true)
	if code != 0 {
		t.Fatalf("login: 0x%02x", code)
	}
	c.subscribe("$m2m/"+term.sn+"/key", 0)
	pk, err := c.nextPublish(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if f, err := term.verifyDown(string(pk.Payload)); err != nil || f[1] != "err" || f[4] != "bk-expired" {
		t.Fatalf("got %q (%v), want err bk-expired", pk.Payload, err)
	}
}

// TestSessionEndsAtExp: the platform closes the connection when the
// session key's life ends (MQTT 5: DISCONNECT 0xA0 maximum connect time).
func TestSessionEndsAtExp(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(o *hook.Options) { o.SessionLifetime = 300 * time.Millisecond })
	term := e.register("A00MS8011390002S", codec.HS256)
	c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), true)
	if code != 0 {
		t.Fatalf("login: 0x%02x", code)
	}
	c.subscribe("$m2m/"+term.sn+"/key", 0)
	if _, err := c.nextPublish(5 * time.Second); err != nil {
		t.Fatalf("no sk: %v", err)
	}
	_, err := c.nextPublish(10 * time.Second)
	if err == nil || !strings.Contains(err.Error(), "0xa0") {
		t.Fatalf("got %v, want DISCONNECT 0xa0", err)
	}
}

// TestMQTT311DataFlow: the whole terminal flow with paho (MQTT 3.1.1):
// login with flag 01, sk, an uplink envelope to an application, a downlink
// envelope back.
func TestMQTT311DataFlow(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	appPW := e.addApp("dash")
	got := make(chan paho.Message, 10)
	app, code := e.pahoConnect("dash-1", "dash", appPW, true, func(_ paho.Client, m paho.Message) { got <- m })
	if code != 0 {
		t.Fatalf("application: %d", code)
	}
	if tok := app.Subscribe("m2m/+/up/#", 1, nil); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("application subscribe: %v", tok.Error())
	}
	msgs := make(chan paho.Message, 10)
	c, code := e.pahoConnect(term.sn, term.username(), e.login(term, true), true, func(_ paho.Client, m paho.Message) { msgs <- m })
	if code != 0 {
		t.Fatalf("terminal: %d", code)
	}
	c.Subscribe("$m2m/"+term.sn+"/key", 1, nil).WaitTimeout(5 * time.Second)
	c.Subscribe("m2m/"+term.sn+"/down/#", 1, nil).WaitTimeout(5 * time.Second)
	var ks []byte
	select {
	case m := <-msgs:
		var err error
		if ks, _, err = term.sessionKey(string(m.Payload())); err != nil {
			t.Fatal(err)
		}
		e.secrets = append(e.secrets, ks)
	case <-time.After(5 * time.Second):
		t.Fatal("no sk")
	}
	up := "m2m/" + term.sn + "/up/temp"
	c.Publish(up, 1, false, sealUp(ks, 1, up, []byte("21.5"))).WaitTimeout(5 * time.Second)
	select {
	case m := <-got:
		if string(m.Payload()) != "21.5" {
			t.Fatalf("application got %q", m.Payload())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("application got nothing")
	}
	down := "m2m/" + term.sn + "/down/cmd"
	app.Publish(down, 1, false, "reboot").WaitTimeout(5 * time.Second)
	select {
	case m := <-msgs:
		if _, plain, err := openDown(ks, down, m.Payload()); err != nil || string(plain) != "reboot" {
			t.Fatalf("downlink %q (%v)", plain, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("terminal got nothing")
	}
}

// TestACLDoesNotAllocate: the ACL runs on every publish and again for
// every recipient.
func TestACLDoesNotAllocate(t *testing.T) {
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	pw := e.addApp("dash")
	if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true); code != 0 {
		t.Fatal(code)
	}
	if _, code := dialV5(t, e.addr, "dash-1", "dash", pw, true); code != 0 {
		t.Fatal(code)
	}
	termCl, _ := e.server.Clients.Get(term.sn)
	appCl, _ := e.server.Clients.Get("dash-1")
	checks := []struct {
		cl    *mqtt.Client
		topic string
		write bool
	}{
		{termCl, "m2m/A00MS8011390002S/up/temp", true},
		{termCl, "m2m/A00MS8011390002S/down/#", false},
		{termCl, "$m2m/A00MS8011390002S/key", false},
		{appCl, "m2m/A00MS8011390002S/up/temp", false},
		{appCl, "m2m/+/up/#", false},
		{appCl, "m2m/A00MS8011390002S/down/cmd", true},
	}
	for _, c := range checks {
		// AllocsPerRun counts the whole process's allocations: the broker's
		// own goroutines (its $SYS ticker, a client's read loop) may
		// allocate during one measurement. The least of three is the
		// check's: an OnACLCheck that allocates does so in every one.
		allocs := testing.AllocsPerRun(100, func() { e.hook.OnACLCheck(c.cl, c.topic, c.write) })
		for i := 0; i < 2 && allocs != 0; i++ {
			allocs = min(allocs, testing.AllocsPerRun(100, func() { e.hook.OnACLCheck(c.cl, c.topic, c.write) }))
		}
		if allocs != 0 {
			t.Errorf("OnACLCheck(%q, write=%v) allocates %.0f times", c.topic, c.write, allocs)
		}
	}
}

// TestLogScanFindsLeaks is the negative control of the secret scan that
// runs after every test of this package.
func TestLogScanFindsLeaks(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	if e.leaks() != 0 {
		t.Fatal("leak before anything was logged")
	}
	e.logs.Write([]byte("oops " + term.up))
	if e.leaks() != 1 {
		t.Fatal("a password in the log went unnoticed")
	}
	e.secrets = nil // the leak above is this test's own doing
}

func TestSessionsAndDisconnect(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	pw := e.addApp("dash")
	c, _ := loginWithKey(t, e, term, true)
	dialV5(t, e.addr, "dash-1", "dash", pw, true)
	// A session is listed once established, just after its CONNACK is out.
	var got []hook.SessionInfo
	testwait.Until(liveness, func() bool { got = e.hook.Sessions(); return len(got) == 2 })
	if len(got) != 2 || got[0].SN != term.sn || !got[0].SessionKey || got[0].SID == "" || got[1].App != "dash" {
		t.Fatalf("sessions: %+v", got)
	}
	if err := e.hook.Disconnect("nobody"); err != hook.ErrNoSession {
		t.Fatalf("disconnect unknown: %v", err)
	}
	if err := e.hook.Disconnect(term.sn); err != nil {
		t.Fatal(err)
	}
	if _, err := c.nextPublish(5 * time.Second); err == nil || !strings.Contains(err.Error(), "0x98") {
		t.Fatalf("got %v, want DISCONNECT 0x98", err)
	}
}
