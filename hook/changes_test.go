package hook_test

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/sms"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

func nonce() uint64 {
	var b [8]byte
	rand.Read(b[:])
	return binary.BigEndian.Uint64(b[:])
}

func (e *env) ts() uint32 { return uint32(e.clock.now().Unix()) }

// keyMessage waits for the next message on the key topic and verifies it
// with down; it returns the fields.
func keyMessage(t *testing.T, c *v5Client, term specTerminal) []string {
	t.Helper()
	pk, err := c.nextPublish(5 * time.Second)
	if err != nil {
		t.Fatalf("waiting for a key-topic message: %v", err)
	}
	f, err := term.verifyDown(string(pk.Payload))
	if err != nil {
		t.Fatalf("key-topic message %q: %v", pk.Payload, err)
	}
	return f
}

// expectClosed waits for the platform to close the connection.
func expectClosed(t *testing.T, c *v5Client) {
	t.Helper()
	for {
		pk, err := c.tryRead(5 * time.Second)
		if err != nil || pk.FixedHeader.Type == 14 /* DISCONNECT */ {
			if err != nil && strings.Contains(err.Error(), "timeout") {
				t.Fatal("connection not closed after done")
			}
			return
		}
	}
}

// TestTerminalCipherChange: chg in ciphertext for each what, the whole way:
// cfg, ack with the new values, done signed with the new down, the
// connection closed, the new values in and the old ones out.
func TestTerminalCipherChange(t *testing.T) {
	t.Parallel()
	for _, what := range []string{"pwd", "bk", "all"} {
		t.Run(what, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			term := e.register("A00MS8011390002S", codec.HS256)
			c, _ := loginWithKey(t, e, term, true)
			rid, next := requestChange(t, e, c, term, what)
			if (next.up != term.up) != (what != "bk") || (string(next.bk) != string(term.bk)) != (what != "pwd") {
				t.Fatalf("params change the wrong values for %s", what)
			}
			c.publish("$m2m/"+term.sn+"/ctl", term.ack(next, rid, what != "pwd", e.ts(), nonce()), 1)
			f := keyMessage(t, c, next) // done is signed with the new down
			if f[1] != "done" || f[4] != rid {
				t.Fatalf("got %v, want done %s", f, rid)
			}
			expectClosed(t, c)
			if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(next, what != "pwd"), true); code != 0 {
				t.Fatalf("login with the new values: 0x%02x", code)
			}
			if what != "bk" {
				if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true); code != v5BadCredentials {
					t.Fatalf("login with the old password: 0x%02x, want refused", code)
				}
			}
			if got := e.counter("m2mguard_changes_total", "event", "committed", "detail", "ack"); got != 1 {
				t.Fatalf("commits by ack: %v", got)
			}
			if !strings.Contains(e.logs.String(), `"event":"change_started"`) || !strings.Contains(e.logs.String(), `"event":"change_delivered"`) {
				t.Fatal("audit events missing")
			}
		})
	}
}

// TestTerminalSMSChange: without a basic key in sync the platform answers
// acc and sends the new values by SMS through the gateway.
func TestTerminalSMSChange(t *testing.T) {
	t.Parallel()
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	e := newEnv(t, func(o *hook.Options) { o.SMS = newSender(gw.URL()) })
	term := e.register("A00MS8011390002S", codec.HS256, func(r *keysvc.RegisterRequest) { r.MSISDN = "8613800000001" })
	c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true) // no flag 01: bk not in sync
	if code != 0 {
		t.Fatal(code)
	}
	c.subscribe("$m2m/"+term.sn+"/key", 0)
	c.publish("$m2m/"+term.sn+"/ctl", term.chg("pwd", "cipher", e.ts(), nonce()), 1)
	f := keyMessage(t, c, term)
	if f[1] != "acc" || f[5] != "sms" {
		t.Fatalf("got %v, want acc ... sms", f)
	}
	rid := f[4]
	var text string
	testwait.For(t, 5*time.Second, "the SMS to 8613800000001", func() bool {
		for _, m := range gw.Messages() {
			if m.To == "8613800000001" {
				text = m.Text
			}
		}
		return text != ""
	})
	params, err := term.smsText(text, rid)
	if err != nil {
		t.Fatalf("sms: %v", err)
	}
	next, _ := term.applyParams(params)
	e.secrets = append(e.secrets, []byte(next.up), []byte(next.down))
	c.publish("$m2m/"+term.sn+"/ctl", term.ack(next, rid, false, e.ts(), nonce()), 1)
	if f := keyMessage(t, c, next); f[1] != "done" {
		t.Fatalf("got %v, want done", f)
	}
	if rec, _ := e.svc.Get(t.Context(), term.sn); rec.Pending != nil || string(rec.Creds.Up) != next.up {
		t.Fatal("change not committed")
	}
}

// TestChangeErrors: busy, no-channel, replay, skew and a bad digest are
// answered with err messages signed with the downlink password.
func TestChangeErrors(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	plain := e.register("PLAIN1", codec.HS256)
	ctl := "$m2m/" + term.sn + "/ctl"

	// no-channel: no bk in sync (no flag 01), no MSISDN, no gateway.
	cp, _ := dialV5(t, e.addr, plain.sn, plain.username(), e.login(plain, false), true)
	cp.subscribe("$m2m/"+plain.sn+"/key", 0)
	cp.publish("$m2m/"+plain.sn+"/ctl", plain.chg("pwd", "cipher", e.ts(), nonce()), 1)
	if f := keyMessage(t, cp, plain); f[1] != "err" || f[4] != "no-channel" {
		t.Fatalf("got %v, want err no-channel", f)
	}

	c, _ := loginWithKey(t, e, term, true)
	first := term.chg("pwd", "cipher", e.ts(), nonce())
	c.publish(ctl, first, 1)
	if f := keyMessage(t, c, term); f[1] != "cfg" {
		t.Fatalf("got %v, want cfg", f)
	}
	cases := []struct {
		name    string
		payload []byte
		code    string
	}{
		{"busy", term.chg("bk", "cipher", e.ts(), nonce()), "busy"},
		{"replay", first, "replay"},
		{"skew", term.chg("pwd", "cipher", e.ts()-400, nonce()), "skew"},
		{"bad digest", func() []byte { o := term; o.up = "NotThePassword00"; return o.chg("pwd", "cipher", e.ts(), nonce()) }(), "bad-request"},
		{"garbage", []byte("M2M1.chg.hs256.x"), "bad-request"},
		{"unknown rid", term.ack(term, "00000000000000ff", false, e.ts(), nonce()), "unknown-rid"},
	}
	for _, tc := range cases {
		c.publish(ctl, tc.payload, 1)
		if f := keyMessage(t, c, term); f[1] != "err" || f[4] != tc.code {
			t.Errorf("%s: got %v, want err %s", tc.name, f, tc.code)
		}
	}
}

// TestPlatformChangeOnlineAndOffline: an operator's change reaches an
// online terminal at once, and an offline one after its next login.
func TestPlatformChangeOnlineAndOffline(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	c, _ := loginWithKey(t, e, term, true)
	ch, err := e.hook.StartChange(t.Context(), term.sn, codec.WhatPwd)
	if err != nil {
		t.Fatal(err)
	}
	if !ch.Delivered || ch.Mode != codec.ModeCipher {
		t.Fatalf("online change returned as delivered=%v mode=%s, want delivered by cipher", ch.Delivered, ch.Mode)
	}
	if f := keyMessage(t, c, term); f[1] != "cfg" || f[4] != ch.RID.String() {
		t.Fatalf("online: got %v, want cfg %s", f, ch.RID)
	}

	off := e.register("OFFLINE1", codec.HS256)
	ch2, err := e.hook.StartChange(t.Context(), off.sn, codec.WhatAll)
	if err != nil {
		t.Fatal(err)
	}
	if rec, _ := e.svc.Get(t.Context(), off.sn); rec.Pending == nil || rec.Pending.Delivered {
		t.Fatal("offline terminal: change should wait undelivered")
	}
	oc, _ := dialV5(t, e.addr, off.sn, off.username(), e.login(off, true), true)
	oc.subscribe("$m2m/"+off.sn+"/key", 0)
	var gotCfg bool
	for i := 0; i < 2; i++ { // sk and cfg, in either order
		f := keyMessage(t, oc, off)
		gotCfg = gotCfg || (f[1] == "cfg" && f[4] == ch2.RID.String())
	}
	if !gotCfg {
		t.Fatal("offline terminal: no cfg after its login")
	}
}

// TestSMSGatewayFaults: a gateway that fails, or answers slower than the
// sender's timeout, is retried; the change stays pending and undelivered
// meanwhile and goes out when the gateway is back.
func TestSMSGatewayFaults(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		fault   func(gw *smstest.Server)
		recover func(gw *smstest.Server)
		sender  func(url string) *sms.HTTPSender
	}{
		{"down", // more failures than the sender's own retries: the hook must retry
			func(gw *smstest.Server) { gw.FailNext(100) }, func(gw *smstest.Server) { gw.FailNext(0) }, newSender},
		{"timeout",
			func(gw *smstest.Server) { gw.Delay(2 * time.Second) }, func(gw *smstest.Server) { gw.Delay(0) },
			func(url string) *sms.HTTPSender {
				return &sms.HTTPSender{URL: url + "/send", Retries: 0, Timeout: 100 * time.Millisecond}
			}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			gw, err := smstest.Start("127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer gw.Close()
			tc.fault(gw)
			e := newEnv(t, func(o *hook.Options) { o.SMS = tc.sender(gw.URL()); o.SMSRetry = 20 * time.Millisecond })
			term := e.register("A00MS8011390002S", codec.HS256, func(r *keysvc.RegisterRequest) { r.MSISDN = "8613800000001" })
			c, _ := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true)
			c.subscribe("$m2m/"+term.sn+"/key", 0)
			c.publish("$m2m/"+term.sn+"/ctl", term.chg("pwd", "sms", e.ts(), nonce()), 1)
			if f := keyMessage(t, c, term); f[1] != "acc" {
				t.Fatalf("got %v, want acc", f)
			}
			testwait.For(t, 5*time.Second, "a failed sms-send recorded", func() bool {
				return strings.Contains(e.logs.String(), `"step":"sms-send"`)
			})
			if rec, _ := e.svc.Get(t.Context(), term.sn); rec.Pending == nil || rec.Pending.Delivered {
				t.Fatal("pending change lost or marked delivered while the gateway fails")
			}
			tc.recover(gw)
			testwait.For(t, 10*time.Second, "the change delivered by SMS after the gateway recovered", func() bool {
				rec, _ := e.svc.Get(t.Context(), term.sn)
				return rec.Pending != nil && rec.Pending.Delivered && rec.Pending.Mode == codec.ModeSMS
			})
			if len(gw.Messages()) == 0 {
				t.Fatal("delivered, but the gateway recorded no SMS")
			}
		})
	}
}

// TestChangeExpires: past its deadline a change is dropped, recorded, and
// the old values stay valid.
func TestChangeExpires(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	if _, err := e.hook.StartChange(t.Context(), term.sn, codec.WhatPwd); err != nil {
		t.Fatal(err)
	}
	e.clock.advance(25 * time.Hour)
	e.hook.ExpireChanges(t.Context())
	if !strings.Contains(e.logs.String(), `"event":"change_expired"`) {
		t.Fatal("expiry not recorded")
	}
	if rec, _ := e.svc.Get(t.Context(), term.sn); rec.Pending != nil {
		t.Fatal("expired change still pending")
	}
	if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true); code != 0 {
		t.Fatalf("old values after expiry: 0x%02x", code)
	}
}

func newSender(url string) *sms.HTTPSender {
	return &sms.HTTPSender{URL: url + "/send", Retries: 1, Backoff: 10 * time.Millisecond, Timeout: 2 * time.Second}
}

// TestSMSRetryHonoursRetryAfter: a gateway that asks for a longer pause
// (429 Retry-After) than the sender may wait within one send is not asked
// again before that pause is over, although the hook's own retry back-off
// is shorter.
func TestSMSRetryHonoursRetryAfter(t *testing.T) {
	t.Parallel()
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	gw.RetryAfter("2")
	gw.FailNextWith(1, http.StatusTooManyRequests)
	sender := &sms.HTTPSender{URL: gw.URL() + "/send", Retries: 0, MaxRetryAfter: 100 * time.Millisecond, Timeout: 2 * time.Second}
	e := newEnv(t, func(o *hook.Options) { o.SMS = sender; o.SMSRetry = 20 * time.Millisecond })
	term := e.register("A00MS8011390002S", codec.HS256, func(r *keysvc.RegisterRequest) { r.MSISDN = "8613800000001" })
	c, _ := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true)
	c.subscribe("$m2m/"+term.sn+"/key", 0)
	c.publish("$m2m/"+term.sn+"/ctl", term.chg("pwd", "sms", e.ts(), nonce()), 1)
	if f := keyMessage(t, c, term); f[1] != "acc" {
		t.Fatalf("got %v, want acc", f)
	}
	testwait.For(t, 10*time.Second, "the SMS sent again", func() bool { return len(gw.Arrivals()) >= 2 })
	a := gw.Arrivals()
	if gap := a[1].Sub(a[0]); gap < 2*time.Second {
		t.Fatalf("asked again %v after a 429 with Retry-After 2 s", gap)
	}
}

// midLoginRegistry runs during once, for terminal sn, right after a login
// has read the terminal's record (Lookup) and before the login goes on.
type midLoginRegistry struct {
	hook.Registry
	sn     string
	during func()
	once   sync.Once
}

func (r *midLoginRegistry) Lookup(ctx context.Context, sn string) (*keysvc.Terminal, error) {
	t, err := r.Registry.Lookup(ctx, sn)
	if sn == r.sn {
		r.once.Do(r.during)
	}
	return t, err
}

// TestChangeStartedDuringLoginIsDelivered: an operator's change started
// while a login of the terminal is in progress (its record read without
// the change, its connection not registered with mochi yet, so the start
// finds it offline) goes out on that connection, not only at the next
// login: a campaign that resumes while the fleet logs back in after a
// restart starts changes in this window.
func TestChangeStartedDuringLoginIsDelivered(t *testing.T) {
	reg := &midLoginRegistry{}
	e := newEnv(t, func(o *hook.Options) { reg.Registry, o.Registry = o.Registry, reg })
	term := e.register("MIDLOGIN1", codec.HS256)
	var started *keysvc.Change
	reg.sn, reg.during = term.sn, func() {
		var err error
		if started, err = e.hook.StartChange(context.Background(), term.sn, codec.WhatPwd); err != nil {
			t.Error(err)
		}
	}
	c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), true)
	if code != 0 {
		t.Fatalf("login refused: 0x%02x", code)
	}
	if started == nil || started.Delivered {
		t.Fatalf("the change was not started during the login, or found the terminal online: %+v", started)
	}
	c.subscribe("$m2m/"+term.sn+"/key", 0)
	var gotCfg bool
	for i := 0; i < 2 && !gotCfg; i++ { // sk and cfg, in either order
		f := keyMessage(t, c, term)
		gotCfg = f[1] == "cfg" && f[4] == started.RID.String()
	}
	if !gotCfg {
		t.Fatal("no cfg on the connection whose login was in progress when the change started")
	}
	if rec, _ := e.svc.Get(context.Background(), term.sn); rec.Pending == nil || !rec.Pending.Delivered {
		t.Fatal("the change is not recorded as delivered")
	}
}
