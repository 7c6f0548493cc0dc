package hook_test

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

const (
	subAckQoS0    = 0x00
	subAckRefused = 0x87
)

// loginWithKey logs a terminal in with flag 01, subscribes to its key
// topic and returns the session key from the sk message, verified as SPEC
// says.
func loginWithKey(t *testing.T, e *env, term specTerminal, clean bool) (*v5Client, []byte) {
	t.Helper()
	c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), clean)
	if code != 0 {
		t.Fatalf("login: 0x%02x", code)
	}
	if rc := c.subscribe("$m2m/"+term.sn+"/key", 1); rc >= 0x80 {
		t.Fatalf("subscribe key topic: 0x%02x", rc)
	}
	pk, err := c.nextPublish(5 * time.Second)
	if err != nil {
		t.Fatalf("no key message: %v", err)
	}
	ks, exp, err := term.sessionKey(string(pk.Payload))
	if err != nil {
		t.Fatalf("sk: %v", err)
	}
	if want := uint64(e.clock.now().Add(24 * time.Hour).Unix()); exp < want-5 || exp > want+5 {
		t.Fatalf("exp %d, want about T+24h = %d", exp, want)
	}
	e.secrets = append(e.secrets, ks)
	return c, ks
}

func TestSessionKeyAfterSubscribe(t *testing.T) {
	t.Parallel()
	for _, alg := range []codec.Alg{codec.MD5, codec.HS256} {
		t.Run(alg.String(), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			loginWithKey(t, e, e.register("A00MS8011390002S", alg), true)
			if got := e.counter("m2mguard_session_keys_issued_total"); got != 1 {
				t.Fatalf("keys issued %v, want 1", got)
			}
			// One event per login, naming the key by its sid.
			logs := e.logs.String()
			if n := strings.Count(logs, `"event":"login_accepted"`); n != 1 || !strings.Contains(logs, `"session_key":true,"sid":"`) {
				t.Fatalf("want one login_accepted event with the sid, got %d in:\n%s", n, logs)
			}
		})
	}
}

// TestSessionKeyPersistentSession: a terminal subscribed in an earlier
// persistent session gets its new key as soon as it logs in again.
func TestSessionKeyPersistentSession(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	c, ks1 := loginWithKey(t, e, term, false)
	c.conn.Close()
	e.awaitOffline(term.sn)
	c2, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), false)
	if code != 0 {
		t.Fatalf("second login: 0x%02x", code)
	}
	pk, err := c2.nextPublish(5 * time.Second)
	if err != nil {
		t.Fatalf("no key message without subscribing again: %v", err)
	}
	ks2, _, err := term.sessionKey(string(pk.Payload))
	if err != nil || bytes.Equal(ks1, ks2) {
		t.Fatalf("second session key: %v (same as the first: %v)", err, bytes.Equal(ks1, ks2))
	}
}

func TestBasicKeyMismatch(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	wrong := term
	wrong.bk = bytes.Repeat([]byte{9}, 32)
	c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(wrong, true), true)
	if code != 0 {
		t.Fatalf("login with a wrong bk must still succeed: 0x%02x", code)
	}
	c.subscribe("$m2m/"+term.sn+"/key", 0)
	pk, err := c.nextPublish(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	f, err := term.verifyDown(string(pk.Payload))
	if err != nil || f[1] != "err" || f[4] != "bk-mismatch" {
		t.Fatalf("got %q (%v), want a verified err bk-mismatch", pk.Payload, err)
	}
}

// TestEnvelopes: uplink envelopes reach applications as plaintext, once;
// replayed and tampered ones are dropped; downlink plaintext from an
// application reaches the terminal sealed under its session key.
func TestEnvelopes(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	appPW := e.addApp("dash")
	app, code := dialV5(t, e.addr, "dash-1", "dash", appPW, true)
	if code != 0 {
		t.Fatalf("application login: 0x%02x", code)
	}
	if rc := app.subscribe("m2m/+/up/#", 1); rc >= 0x80 {
		t.Fatalf("application subscribe: 0x%02x", rc)
	}
	c, ks := loginWithKey(t, e, term, true)
	if rc := c.subscribe("m2m/"+term.sn+"/down/#", 1); rc >= 0x80 {
		t.Fatalf("terminal subscribe down: 0x%02x", rc)
	}

	up := "m2m/" + term.sn + "/up/temp"
	env1 := sealUp(ks, 1, up, []byte(`{"t":21.5}`))
	if rc := c.publish(up, env1, 1); rc != 0 {
		t.Fatalf("uplink puback 0x%02x", rc)
	}
	pk, err := app.nextPublish(5 * time.Second)
	if err != nil || string(pk.Payload) != `{"t":21.5}` {
		t.Fatalf("application got %q (%v), want the plaintext", pk.Payload, err)
	}
	// A QoS 1 redelivery of seq 1 is acknowledged and not delivered again.
	if rc := c.publish(up, env1, 1); rc != 0 {
		t.Fatalf("redelivery puback 0x%02x, want success", rc)
	}
	// A tampered envelope is acknowledged and dropped.
	bad := sealUp(ks, 2, up, []byte("x"))
	bad[len(bad)-1] ^= 1
	if rc := c.publish(up, bad, 1); rc != 0 {
		t.Fatalf("tampered puback 0x%02x", rc)
	}
	if rc := c.publish(up, sealUp(ks, 3, up, []byte("three")), 1); rc != 0 {
		t.Fatalf("seq 3 puback 0x%02x", rc)
	}
	if pk, err := app.nextPublish(5 * time.Second); err != nil || string(pk.Payload) != "three" {
		t.Fatalf("after the replay and the tampered one, got %q (%v), want \"three\"", pk.Payload, err)
	}
	if got := e.counter("m2mguard_replays_total", "kind", "envelope"); got != 1 {
		t.Fatalf("envelope replays %v, want 1", got)
	}
	if got := e.counter("m2mguard_envelope_failures_total", "reason", "open"); got != 1 {
		t.Fatalf("envelope failures %v, want 1", got)
	}

	// Downlink: the application publishes plaintext, the terminal gets an envelope.
	down := "m2m/" + term.sn + "/down/cmd"
	if rc := app.publish(down, []byte("reboot"), 1); rc != 0 {
		t.Fatalf("downlink puback 0x%02x", rc)
	}
	pk, err = c.nextPublish(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	seq, plain, err := openDown(ks, down, pk.Payload)
	if err != nil || string(plain) != "reboot" || seq != 1 {
		t.Fatalf("downlink: seq %d %q (%v)", seq, plain, err)
	}
}

// TestQueuedDownlinkSealedForNextSession: a message queued while the
// terminal is offline is sealed under the key of the session that gets it.
func TestQueuedDownlinkSealedForNextSession(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	appPW := e.addApp("dash")
	app, _ := dialV5(t, e.addr, "dash-1", "dash", appPW, true)
	c, _ := loginWithKey(t, e, term, false)
	c.subscribe("m2m/"+term.sn+"/down/#", 1)
	c.conn.Close()
	e.awaitOffline(term.sn) // else the message may reach the closing connection
	down := "m2m/" + term.sn + "/down/cmd"
	app.publish(down, []byte("queued"), 1)

	c2, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), false)
	if code != 0 {
		t.Fatalf("relogin: 0x%02x", code)
	}
	var ks []byte
	var env []byte
	for ks == nil || env == nil {
		pk, err := c2.nextPublish(5 * time.Second)
		if err != nil {
			t.Fatalf("waiting for key and queued message: %v", err)
		}
		if strings.HasPrefix(pk.TopicName, "$m2m/") {
			if ks, _, err = term.sessionKey(string(pk.Payload)); err != nil {
				t.Fatal(err)
			}
		} else {
			env = pk.Payload
		}
	}
	if _, plain, err := openDown(ks, down, env); err != nil || string(plain) != "queued" {
		t.Fatalf("queued message under the new key: %q (%v)", plain, err)
	}
}

// TestRepeatedTamperingEndsSession: MaxEnvelopeFailures bad envelopes end
// the session.
func TestRepeatedTamperingEndsSession(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	c, ks := loginWithKey(t, e, term, true)
	up := "m2m/" + term.sn + "/up/temp"
	for i := uint64(1); i <= 3; i++ {
		bad := sealUp(ks, i, up, []byte("x"))
		bad[10] ^= 1
		c.publish(up, bad, 0)
	}
	if _, err := c.nextPublish(5 * time.Second); err == nil || !strings.Contains(err.Error(), "disconnected") && !strings.Contains(err.Error(), "EOF") {
		t.Fatalf("session not ended: %v", err)
	}
}

// TestRequireEncryption: a terminal whose record demands encryption cannot
// publish plaintext data without a session key.
func TestRequireEncryption(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256, func(r *keysvc.RegisterRequest) { r.RequireEncryption = true })
	c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true)
	if code != 0 {
		t.Fatalf("login: 0x%02x", code)
	}
	if rc := c.publish("m2m/"+term.sn+"/up/temp", []byte("plain"), 1); rc != 0x87 {
		t.Fatalf("plaintext publish: puback 0x%02x, want 0x87 not authorized", rc)
	}
}
