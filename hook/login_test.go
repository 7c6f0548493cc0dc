package hook_test

import (
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// CONNACK codes of SPEC section 3.
const (
	v5BadCredentials = 0x86
	v5NotAuthorized  = 0x87
	v5Banned         = 0x8A
	v3NotAuthorized  = 0x05
)

func TestLoginAccepted(t *testing.T) {
	t.Parallel()
	for _, alg := range []codec.Alg{codec.MD5, codec.HS256} {
		t.Run(alg.String(), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			term := e.register("A00MS8011390002S", alg)
			if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true); code != 0 {
				t.Fatalf("MQTT 5: CONNACK 0x%02x, want success", code)
			}
			if _, code := e.pahoConnect(term.sn, term.username(), e.login(term, false), true, nil); code != 0 {
				t.Fatalf("MQTT 3.1.1: CONNACK %d, want success", code)
			}
			if got := e.counter("m2mguard_logins_total", "result", "accepted"); got != 2 {
				t.Fatalf("accepted logins metric %v, want 2", got)
			}
			if n := strings.Count(e.logs.String(), `"event":"login_accepted","sn":"A00MS8011390002S"`); n != 2 {
				t.Fatalf("%d login_accepted events, want 2:\n%s", n, e.logs.String())
			}
		})
	}
}

// TestLoginRefusals covers every refusal of SPEC section 3, under both
// protocol versions: the CONNACK code, the reason in the metrics and log.
func TestLoginRefusals(t *testing.T) {
	t.Parallel()
	type attempt struct {
		clientID, username string
		password           []byte
	}
	tests := []struct {
		name   string
		reason string
		v5     byte
		// make prepares the environment and returns the attempt.
		make func(e *env, term specTerminal) attempt
	}{
		{"malformed password", "malformed", v5BadCredentials, func(e *env, term specTerminal) attempt {
			return attempt{term.sn, term.username(), []byte("M2M1.hs256.00.x")}
		}},
		{"unknown terminal", "unknown-terminal", v5BadCredentials, func(e *env, term specTerminal) attempt {
			other := term
			other.sn = "UNKNOWN1"
			return attempt{other.sn, other.username(), e.login(other, false)}
		}},
		{"SIM moved (IMSI changed)", "binding-mismatch", v5BadCredentials, func(e *env, term specTerminal) attempt {
			term.imsi = "460020084678999"
			return attempt{term.sn, term.username(), e.login(term, false)}
		}},
		{"device swapped (IMEI changed)", "binding-mismatch", v5BadCredentials, func(e *env, term specTerminal) attempt {
			term.imei = "354494040518999"
			return attempt{term.sn, term.username(), e.login(term, false)}
		}},
		{"alg downgrade", "alg-mismatch", v5BadCredentials, func(e *env, term specTerminal) attempt {
			term.alg = "md5"
			return attempt{term.sn, term.username(), e.login(term, false)}
		}},
		{"clock skew", "skew", v5BadCredentials, func(e *env, term specTerminal) attempt {
			return attempt{term.sn, term.username(), []byte(term.password(false, uint32(e.clock.now().Unix())-301, 42))}
		}},
		{"wrong password", "bad-digest", v5BadCredentials, func(e *env, term specTerminal) attempt {
			term.up = "NotThePassword00"
			return attempt{term.sn, term.username(), e.login(term, false)}
		}},
		{"expired beyond grace", "expired", v5BadCredentials, func(e *env, term specTerminal) attempt {
			e.clock.advance(passwordLifetime + 7*24*time.Hour + time.Minute)
			return attempt{term.sn, term.username(), e.login(term, false)}
		}},
		{"disabled", "disabled", v5NotAuthorized, func(e *env, term specTerminal) attempt {
			if _, err := e.svc.SetStatus(t.Context(), term.sn, keysvc.StatusDisabled); err != nil {
				e.t.Fatal(err)
			}
			return attempt{term.sn, term.username(), e.login(term, false)}
		}},
		{"anonymous", "anonymous", v5BadCredentials, func(e *env, term specTerminal) attempt {
			return attempt{"some-app-client", "", nil}
		}},
		{"application with a wrong password", "bad-application-credentials", v5BadCredentials, func(e *env, term specTerminal) attempt {
			e.addApp("dash")
			return attempt{"dash-1", "dash", []byte("not-the-app-password")}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			term := e.register("A00MS8011390002S", codec.HS256)
			a := tc.make(e, term)
			if _, code := dialV5(t, e.addr, a.clientID, a.username, a.password, true); code != tc.v5 {
				t.Errorf("MQTT 5: CONNACK 0x%02x, want 0x%02x", code, tc.v5)
			}
			a = tc.make(e, term) // a fresh nonce, so the second try is not a replay
			if _, code := e.pahoConnect(a.clientID, a.username, a.password, true, nil); code != v3NotAuthorized {
				t.Errorf("MQTT 3.1.1: CONNACK %d, want 5", code)
			}
			if got := e.counter("m2mguard_logins_total", "result", "refused", "reason", tc.reason); got != 2 {
				t.Errorf("refusals with reason %q: %v, want 2", tc.reason, got)
			}
			if !strings.Contains(e.logs.String(), `"reason":"`+tc.reason+`"`) {
				t.Errorf("no log event with reason %q", tc.reason)
			}
		})
	}
}

func TestReplayedLogin(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	pw := e.login(term, false)
	c, code := dialV5(t, e.addr, term.sn, term.username(), pw, true)
	if code != 0 {
		t.Fatalf("first login: 0x%02x", code)
	}
	c.conn.Close()
	if _, code := dialV5(t, e.addr, term.sn, term.username(), pw, true); code != v5BadCredentials {
		t.Fatalf("replayed login: CONNACK 0x%02x, want 0x86", code)
	}
	if got := e.counter("m2mguard_logins_total", "reason", "replay"); got != 1 {
		t.Fatalf("replay refusals %v, want 1", got)
	}
}

// TestBindingEventNamesTheChange: the log says which of IMEI and IMSI changed.
func TestBindingEventNamesTheChange(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	moved := term
	moved.imsi = "460020084678999"
	dialV5(t, e.addr, moved.sn, moved.username(), e.login(moved, false), true)
	if !strings.Contains(e.logs.String(), `"event":"binding_mismatch"`) || !strings.Contains(e.logs.String(), `"changed":"imsi"`) {
		t.Fatal("no binding event naming the IMSI")
	}
	if got := e.counter("m2mguard_binding_events_total", "changed", "imsi"); got != 1 {
		t.Fatalf("binding events %v, want 1", got)
	}
}

// TestThrottle: after Free failures from one address, that address is
// refused with 0x8A even with the right password; the same terminal from
// another address still gets in.
func TestThrottle(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	bad := term
	bad.up = "NotThePassword00"
	for i := 0; i < 3; i++ {
		if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(bad, false), true); code != v5BadCredentials {
			t.Fatalf("failure %d: 0x%02x", i, code)
		}
	}
	if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true); code != v5Banned {
		t.Fatalf("right password from the throttled address: 0x%02x, want 0x8A", code)
	}
	// 127.0.0.2 is another loopback address.
	if _, code := dialV5From(t, "127.0.0.2", e.addr, term.sn, term.username(), e.login(term, false)); code != 0 {
		t.Fatalf("from another address: 0x%02x, want success", code)
	}
}

// TestPendingPasswordCommits: a login with the pending new up commits the
// change (its ack was lost), and the old up stops working.
func TestPendingPasswordCommits(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	ctx := t.Context()
	ch, err := e.svc.StartChange(ctx, term.sn, keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher})
	if err != nil {
		t.Fatal(err)
	}
	e.secrets = append(e.secrets, ch.New.Up, ch.New.Down)
	// Until the commit, the old values stay valid.
	if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true); code != 0 {
		t.Fatalf("old password during the change: 0x%02x", code)
	}
	next := term
	next.up, next.down = string(ch.New.Up), string(ch.New.Down)
	if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(next, false), true); code != 0 {
		t.Fatalf("pending password: 0x%02x, want success", code)
	}
	got, err := e.svc.Get(ctx, term.sn)
	if err != nil || got.Pending != nil || got.LastCommitted != ch.RID || string(got.Creds.Up) != next.up {
		t.Fatalf("change not committed: %v", err)
	}
	if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true); code != v5BadCredentials {
		t.Fatalf("old password after the commit: 0x%02x, want 0x86", code)
	}
}

// TestClientIDBoundToSN: an application cannot use a terminal's ClientID,
// and another terminal's credentials under it are refused, so the session
// of the terminal is never taken over.
func TestClientIDBoundToSN(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	a := e.register("TERMA", codec.HS256)
	b := e.register("TERMB", codec.HS256)
	pw := e.addApp("dash")
	victim, code := dialV5(t, e.addr, a.sn, a.username(), e.login(a, false), false)
	if code != 0 {
		t.Fatalf("terminal A: 0x%02x", code)
	}
	if _, code := dialV5(t, e.addr, a.sn, "dash", pw, true); code != v5BadCredentials {
		t.Fatalf("application as ClientID %s: 0x%02x, want 0x86", a.sn, code)
	}
	if _, code := dialV5(t, e.addr, a.sn, b.username(), e.login(b, false), true); code != v5BadCredentials {
		t.Fatalf("terminal B as ClientID %s: 0x%02x, want 0x86", a.sn, code)
	}
	// A's connection is still up: a ping would fail otherwise.
	if victim.subscribe("$m2m/"+a.sn+"/key", 0) >= 0x80 {
		t.Fatal("terminal A lost its session")
	}
}
