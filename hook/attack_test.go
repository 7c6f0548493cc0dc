package hook_test

import (
	"bytes"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
)

// TestOversizeFields: fields beyond the bounds of SPEC section 8 are
// refused before any cryptography, and the broker stays up.
func TestOversizeFields(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	long := append([]byte("M2M1.hs256.00.1764316800.0123456789abcdef.."), bytes.Repeat([]byte("a"), 200)...)
	if _, code := dialV5(t, e.addr, term.sn, term.username(), long, true); code != v5BadCredentials {
		t.Fatalf("201+ byte password: 0x%02x", code)
	}
	if _, code := dialV5(t, e.addr, term.sn, strings.Repeat("1", 5000), e.login(term, false), true); code != v5BadCredentials {
		t.Fatalf("5000 byte username: 0x%02x", code)
	}
	if _, code := dialV5(t, e.addr, strings.Repeat("A", 5000), term.username(), e.login(term, false), true); code != v5BadCredentials {
		t.Fatalf("5000 byte ClientID: 0x%02x", code)
	}
	c, _ := loginWithKey(t, e, term, true)
	c.publish("$m2m/"+term.sn+"/ctl", bytes.Repeat([]byte("M"), codec.MaxControlLen+1), 1)
	if f := keyMessage(t, c, term); f[1] != "err" || f[4] != "bad-request" {
		t.Fatalf("oversize control payload: got %v", f)
	}
	// The long password and username are malformed terminal logins; a
	// ClientID that is no serial number is an application's, refused too.
	if got := e.counter("m2mguard_logins_total", "result", "refused"); got != 3 {
		t.Fatalf("refusals %v, want 3", got)
	}
	if got := e.counter("m2mguard_logins_total", "result", "accepted"); got != 1 {
		t.Fatalf("accepted %v, want 1", got)
	}
}

// TestBadConnectFlood: a flood of bad CONNECTs (wrong passwords for a real
// terminal, unknown terminals, garbage) from one address while the real
// terminal logs in from another address. Every good login succeeds; every
// bad one is refused. M2MGUARD_FLOOD_SECONDS runs it for longer at full
// speed (the documented run: 30 s).
func TestBadConnectFlood(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	bad := term
	bad.up = "NotThePassword00"
	unknown := term
	unknown.sn = "NOBODY"
	duration := 2 * time.Second
	if s, err := strconv.Atoi(os.Getenv("M2MGUARD_FLOOD_SECONDS")); err == nil {
		duration = time.Duration(s) * time.Second
	}
	var attempts, refused, accepted atomic.Int64
	stop := time.Now().Add(duration)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(stop); i++ {
				var c *v5Client
				var code byte
				switch i % 3 {
				case 0:
					c, code = dialV5(t, e.addr, term.sn, term.username(), e.login(bad, false), true)
				case 1:
					c, code = dialV5(t, e.addr, unknown.sn, unknown.username(), e.login(unknown, false), true)
				default:
					c, code = dialV5(t, e.addr, term.sn, "x", []byte("garbage"), true)
				}
				c.conn.Close()
				attempts.Add(1)
				if code == 0 {
					accepted.Add(1)
				} else {
					refused.Add(1)
				}
			}
		}()
	}
	good, goodOK := 0, 0
	for time.Now().Before(stop) {
		good++
		c, code := dialV5From(t, "127.0.0.2", e.addr, term.sn, term.username(), e.login(term, false))
		if code == 0 {
			goodOK++
		}
		c.conn.Close()
		time.Sleep(20 * time.Millisecond)
	}
	wg.Wait()
	t.Logf("flood for %s: %d bad connects (%.0f/s), %d refused, %d accepted; real terminal from another address: %d/%d logins",
		duration, attempts.Load(), float64(attempts.Load())/duration.Seconds(), refused.Load(), accepted.Load(), goodOK, good)
	if accepted.Load() != 0 || goodOK != good || good == 0 {
		t.Fatalf("%d bad connects accepted, %d of %d good logins succeeded", accepted.Load(), goodOK, good)
	}
}

// FuzzLiveConnect feeds random CONNECT credentials to a live broker with
// the hook: nothing is accepted but a valid login, and the broker keeps
// serving.
func FuzzLiveConnect(f *testing.F) {
	e := newEnvOn(f, embedded(f), nil, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	f.Add(term.sn, term.username(), e.login(term, true))
	f.Add("dash-1", "dash", []byte("app-password"))
	f.Add("", "", []byte{})
	f.Fuzz(func(t *testing.T, clientID, username string, password []byte) {
		c, code, err := tryDialV5(t, net.Dialer{}, e.addr, clientID, username, password, true)
		c.conn.Close()
		if err == nil && code == 0 && (clientID != term.sn || username != term.username()) {
			t.Fatalf("accepted %q %q", clientID, username)
		}
		// Refused with a code or dropped (mochi drops malformed CONNECTs):
		// either way the broker still serves.
		if _, code := dialV5(t, e.addr, "dash-probe", "", nil, true); code != v5BadCredentials {
			t.Fatalf("broker no longer answers as before: 0x%02x", code)
		}
	})
}

// FuzzLiveControl feeds random payloads to $m2m/<sn>/ctl of a logged-in
// terminal: the broker answers, drops or closes, and keeps serving.
func FuzzLiveControl(f *testing.F) {
	e := newEnvOn(f, embedded(f), nil, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	f.Add(term.chg("pwd", "cipher", e.ts(), 1))
	f.Add([]byte("M2M1.ack.hs256.0000000000000001.1.0000000000000002.."))
	f.Add(bytes.Repeat([]byte{0xff}, 2000))
	f.Fuzz(func(t *testing.T, payload []byte) {
		c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), true)
		if code != 0 {
			t.Fatalf("login: 0x%02x", code)
		}
		defer c.conn.Close()
		c.publish("$m2m/"+term.sn+"/ctl", payload, 0)
		c.subscribe("$m2m/"+term.sn+"/key", 0) // a round trip: the broker is still there
	})
}
