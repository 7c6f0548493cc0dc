package hook_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/replay"
)

// restartable starts a broker on the embedded store whose restarts keep
// the store and the replay guard's directory, as a restarted process
// would.
type restartable struct {
	*env
	t     *testing.T
	again func() keysvc.Store
	dir   string // the replay guard's
	guard *replay.Guard
	tune  func(*hook.Options)
}

func newRestartable(t *testing.T, tune func(*hook.Options)) *restartable {
	t.Helper()
	store, again := backends()[0].open(t)
	r := &restartable{t: t, again: again, dir: t.TempDir(), tune: tune}
	r.env = newEnvOn(t, store, nil, r.tuneHook)
	return r
}

// tuneHook opens the replay guard on the directory, on the hook's clock
// (the env's).
func (r *restartable) tuneHook(o *hook.Options) {
	if r.guard != nil {
		r.guard.Close() // as the process ended: its lock is released
	}
	g, err := replay.Open(r.dir, replay.Options{Now: o.Now, Logger: o.Logger})
	if err != nil {
		r.t.Fatal(err)
	}
	r.guard = g
	r.t.Cleanup(func() { g.Close() })
	o.ReplayGuard = g
	if r.tune != nil {
		r.tune(o)
	}
}

// restart kills the broker (every connection drops) and starts it again on
// the same data.
func (r *restartable) restart() {
	r.stop()
	r.start(r.again(), nil, r.tuneHook)
}

// TestLoginReplayAfterRestart: a login token captured from an accepted
// CONNECT is refused when replayed inside the skew window after the broker
// restarted (SECURITY.md, attacks tried).
func TestLoginReplayAfterRestart(t *testing.T) {
	t.Parallel()
	e := newRestartable(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	captured := e.login(term, true)
	c, code := dialV5(t, e.addr, term.sn, term.username(), captured, true)
	if code != 0 {
		t.Fatalf("first login: 0x%02x", code)
	}
	c.conn.Close()

	e.restart()
	e.clock.advance(time.Minute) // well inside the 300 s window
	if _, code := dialV5(t, e.addr, term.sn, term.username(), captured, true); code != v5BadCredentials {
		t.Fatalf("token replayed after the restart: CONNACK 0x%02x, want 0x86", code)
	}
	if got := e.counter("m2mguard_logins_total", "reason", "replay"); got != 1 {
		t.Fatalf("replay refusals %v, want 1", got)
	}
	// The terminal itself still gets in with a fresh token.
	if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true); code != 0 {
		t.Fatalf("fresh login after the restart: 0x%02x", code)
	}
}

// TestControlReplayAfterRestart: chg and ack messages captured from a
// completed change are refused with err replay when replayed inside the
// skew window after the broker restarted, and no change is started again.
// A change of the basic key leaves up as it is, so both messages still
// carry a valid digest after the commit.
func TestControlReplayAfterRestart(t *testing.T) {
	t.Parallel()
	e := newRestartable(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	ctl := "$m2m/" + term.sn + "/ctl"
	c, _ := loginWithKey(t, e.env, term, true)
	chg := term.chg("bk", "cipher", e.ts(), nonce())
	c.publish(ctl, chg, 1)
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
	e.secrets = append(e.secrets, next.bk)
	ack := term.ack(next, rid, true, e.ts(), nonce())
	c.publish(ctl, ack, 1)
	if f := keyMessage(t, c, next); f[1] != "done" {
		t.Fatalf("got %v, want done", f)
	}

	e.restart()
	e.clock.advance(time.Minute)
	c2, _ := loginWithKey(t, e.env, next, true)
	for _, m := range []struct {
		name    string
		payload []byte
	}{{"chg", chg}, {"ack", ack}} {
		c2.publish(ctl, m.payload, 1)
		if f := keyMessage(t, c2, next); f[1] != "err" || f[4] != "replay" {
			t.Errorf("%s replayed after the restart: got %v, want err replay", m.name, f)
		}
	}
	if rec, err := e.svc.Get(t.Context(), term.sn); err != nil || rec.Pending != nil {
		t.Fatalf("a change was started by the replayed chg (%v)", err)
	}
}

// TestConcurrentLoginCopiesOneAccepted: copies of one valid CONNECT sent
// on separate connections at the same moment: exactly one is accepted in
// every round (the replay check and the record of the nonce are one step).
func TestConcurrentLoginCopiesOneAccepted(t *testing.T) {
	t.Parallel()
	const rounds, copies = 100, 2
	e := newEnv(t, func(o *hook.Options) { o.Throttle.Free = 1 << 20 }) // the losers' refusals must not throttle the address
	term := e.register("A00MS8011390002S", codec.HS256)
	var twice int
	for round := 0; round < rounds; round++ {
		connect := connectBytes(term.sn, term.username(), e.login(term, false))
		conns := make([]net.Conn, copies)
		for i := range conns {
			conn, err := net.DialTimeout("tcp", e.addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			conns[i] = conn
		}
		release := make(chan struct{})
		codes := make([]byte, copies)
		var wg sync.WaitGroup
		for i, conn := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				<-release
				conn.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := conn.Write(connect); err != nil {
					codes[i] = 0xff
					return
				}
				c := &v5Client{t: t, conn: conn, r: bufio.NewReader(conn)}
				ack, err := c.tryRead(5 * time.Second)
				if err != nil || ack.FixedHeader.Type != packets.Connack {
					codes[i] = 0xff
					return
				}
				codes[i] = ack.ReasonCode
			}()
		}
		close(release)
		wg.Wait()
		accepted := 0
		for _, code := range codes {
			switch code {
			case 0:
				accepted++
			case v5BadCredentials:
			default:
				t.Fatalf("round %d: CONNACK 0x%02x", round, code)
			}
		}
		if accepted != 1 {
			twice++
			t.Errorf("round %d: %d of %d copies accepted, want 1", round, accepted, copies)
		}
	}
	if twice > 0 {
		t.Fatalf("%d of %d rounds accepted a copy of a login more than once", twice, rounds)
	}
}

// connectBytes encodes an MQTT 5 CONNECT. Workers may call it: it fails
// no test (only a bug in the packet could make the encoding fail).
func connectBytes(clientID, username string, password []byte) []byte {
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 5,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: clientID,
			UsernameFlag: true, Username: []byte(username), PasswordFlag: true, Password: password,
		},
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

// TestReplayGuardDownFailsClosed: when the guard cannot tell whether a
// nonce was used, a login with a valid digest is refused as the store
// being unavailable (0x88) under its own reason, and a control message is
// not acted on.
func TestReplayGuardDownFailsClosed(t *testing.T) {
	t.Parallel()
	var down atomic.Bool
	e := newEnv(t, func(o *hook.Options) {
		o.ReplayGuard = switchGuard{&down, replay.NewMemory(replay.Options{Now: o.Now})}
	})
	term := e.register("A00MS8011390002S", codec.HS256)
	c, _ := loginWithKey(t, e, term, true)
	down.Store(true)
	if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true); code != v5ServerUnavailable {
		t.Fatalf("login with the guard down: 0x%02x, want 0x88", code)
	}
	if got := e.counter("m2mguard_logins_total", "reason", "replay-guard-unavailable"); got != 1 {
		t.Fatalf("refusals for the guard %v, want 1", got)
	}
	// mochi runs the hook before it sends the PUBACK: an answer would
	// have come before it.
	c.publish("$m2m/"+term.sn+"/ctl", term.chg("pwd", "cipher", e.ts(), nonce()), 1)
	for _, pk := range c.held {
		if pk.FixedHeader.Type == packets.Publish {
			t.Fatalf("chg with the guard down answered %q", pk.Payload)
		}
	}
	if rec, err := e.svc.Get(t.Context(), term.sn); err != nil || rec.Pending != nil {
		t.Fatalf("a change was started with the guard down (%v)", err)
	}
	if got := e.counter("m2mguard_changes_total", "event", "failed", "detail", "replay-guard"); got != 1 {
		t.Fatalf("failed control claims %v, want 1", got)
	}
}

// v5ServerUnavailable is the CONNACK code of a login the platform cannot
// check now (SPEC section 3: the store is unreachable).
const v5ServerUnavailable = 0x88

// switchGuard fails while down is set, else asks g.
type switchGuard struct {
	down *atomic.Bool
	g    hook.ReplayGuard
}

func (s switchGuard) Claim(ctx context.Context, sn string, nonce uint64, until time.Time) (bool, error) {
	if s.down.Load() {
		return false, errors.New("guard unreachable")
	}
	return s.g.Claim(ctx, sn, nonce, until)
}
