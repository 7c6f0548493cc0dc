package hook_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

// liveness is how long a login or an admin call may take in these tests
// before it counts as hung: generous, so that a loaded machine never fails
// them, and far below "until the broker restarts".
const liveness = 15 * time.Second

// within runs f in a goroutine and reports whether it returned within
// timeout. f must not call t.Fatal: on a hang it outlives the test's
// goroutine (the test's cleanup closes the sockets that block it).
func within(timeout time.Duration, f func()) bool {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// dialRaw connects with an MQTT 5 CONNECT of the given keepalive (0: the
// broker never times the connection out) and a small receive buffer, so
// that a client that stops reading fills the socket buffers early. It
// returns the client and the CONNACK code, or an error if none came within
// wait.
func dialRaw(t *testing.T, addr, clientID, username string, password []byte, clean bool, keepalive uint16, wait time.Duration) (*v5Client, byte, error) {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
		return errors.Join(err, serr)
	}}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, 0, err
	}
	t.Cleanup(func() { conn.Close() })
	c := &v5Client{t: t, conn: conn, r: bufio.NewReader(conn)}
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 5,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: clean, Keepalive: keepalive, ClientIdentifier: clientID,
			UsernameFlag: true, Username: []byte(username), PasswordFlag: true, Password: password,
		},
	}
	if !clean {
		pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 3600, true
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		return c, 0, err
	}
	conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write(buf.Bytes()); err != nil {
		return c, 0, err
	}
	ack, err := c.tryRead(wait)
	if err != nil {
		return c, 0, err
	}
	if ack.FixedHeader.Type != packets.Connack {
		return c, 0, fmt.Errorf("got packet type %d, want CONNACK", ack.FixedHeader.Type)
	}
	return c, ack.ReasonCode, nil
}

// encode returns the bytes of pk.
func encode(t *testing.T, pk packets.Packet) []byte {
	t.Helper()
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	default:
		err = fmt.Errorf("packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		t.Fatalf("encode: %v", err)
	}
	return buf.Bytes()
}

// flood writes packet (encoded) over and over without reading, in
// batches, until the broker has stopped reading for good (a batch stays
// unwritten for stall and the broker received no packet meanwhile: the
// connection is wedged), the broker closes the connection, or max packets
// are out.
func flood(e *env, c *v5Client, packet []byte, max int, stall time.Duration) (sent int, outcome string) {
	const perBatch = 256
	batch := bytes.Repeat(packet, perBatch)
	pending := batch
	received := atomic.LoadInt64(&e.server.Info.PacketsReceived)
	for sent < max {
		c.conn.SetWriteDeadline(time.Now().Add(stall))
		n, err := c.conn.Write(pending)
		sent += n / len(packet)
		var ne net.Error
		switch {
		case errors.As(err, &ne) && ne.Timeout():
			now := atomic.LoadInt64(&e.server.Info.PacketsReceived)
			if now == received {
				return sent, "wedged"
			}
			received = now
			pending = pending[n:]
		case err != nil:
			return sent, "closed"
		default:
			pending = batch
		}
	}
	return sent, "all sent"
}

// wedge logs term in with keepalive 0 and, if subscribe, subscribes to
// its key topic; then it floods packet without ever reading again.
func wedge(t *testing.T, e *env, term specTerminal, withKey, subscribe bool, packet []byte) *v5Client {
	t.Helper()
	c, code, err := dialRaw(t, e.addr, term.sn, term.username(), e.login(term, withKey), true, 0, liveness)
	if err != nil || code != 0 {
		t.Fatalf("attacker login: 0x%02x %v", code, err)
	}
	if subscribe {
		c.subscribe("$m2m/"+term.sn+"/key", 0)
	}
	sent, outcome := flood(e, c, packet, 1_000_000, time.Second)
	t.Logf("flood: %d packets, then %s", sent, outcome)
	return c
}

// hasSession reports whether Sessions lists clientID.
func hasSession(h *hook.Hook, clientID string) bool {
	for _, s := range h.Sessions() {
		if s.ClientID == clientID {
			return true
		}
	}
	return false
}

// garbageControl is a control message that does not parse.
func garbageControl(sn string) packets.Packet {
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: 5,
		TopicName: "$m2m/" + sn + "/ctl", Payload: []byte("garbage")}
}

// TestNonReadingSessionCannotWedgeLoginOrAdmin (SECURITY.md, attacks tried): a
// terminal session with keepalive 0 stops reading and floods the broker
// until its connection is wedged, (1) with garbage control messages on its
// key topic, whose refusals the hook writes, and (2) with QoS 1 publishes,
// whose PUBACKs mochi writes, holding the client's write lock. An
// administrative disconnect of the wedged session returns and the session
// goes; the genuine terminal's login with the same sn (a takeover of a
// wedged connection) completes.
func TestNonReadingSessionCannotWedgeLoginOrAdmin(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name      string
		withKey   bool // the attacker's login asks for a session key
		subscribe bool // to its key topic
		tune      func(*hook.Options)
		setup     func(t *testing.T, e *env, sn string)
		packet    func(sn string) packets.Packet
	}{
		{name: "garbage control messages", withKey: true, subscribe: true, packet: garbageControl},
		// Without the refusal limit, the err answers pile up faster than
		// the key writer sends them (and stop leaving once the socket is
		// full): the full key queue ends the session.
		{name: "garbage control messages without refusal limit", withKey: true, subscribe: true, packet: garbageControl,
			tune: func(o *hook.Options) { o.MaxControlRefusals = 1 << 30 }},
		{name: "subscriptions to a large retained downlink message", // mochi's own writes
			setup: func(t *testing.T, e *env, sn string) {
				app, code := dialV5(t, e.addr, "dash-1", "dash", e.addApp("dash"), true)
				if code != 0 {
					t.Fatalf("application login: 0x%02x", code)
				}
				retained(t, app, "m2m/"+sn+"/down/big", bytes.Repeat([]byte("d"), 256<<10))
			},
			packet: func(sn string) packets.Packet {
				return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 5,
					PacketID: 1, Filters: packets.Subscriptions{{Filter: "m2m/" + sn + "/down/#"}}}
			}},
	}
	start := func(t *testing.T, tune func(*hook.Options), setup func(*testing.T, *env, string)) (*env, specTerminal) {
		e := newEnv(t, tune)
		term := e.register("A00MS8011390002S", codec.HS256)
		if setup != nil {
			setup(t, e, term.sn)
		}
		return e, term
	}
	for _, tc := range cases {
		t.Run(tc.name+"/admin disconnect", func(t *testing.T) {
			t.Parallel()
			e, term := start(t, tc.tune, tc.setup)
			wedge(t, e, term, tc.withKey, tc.subscribe, encode(t, tc.packet(term.sn)))
			var err error
			start := time.Now()
			if !within(liveness, func() { err = e.hook.Disconnect(term.sn) }) {
				t.Fatalf("Hook.Disconnect of a wedged session did not return within %s", liveness)
			}
			t.Logf("Hook.Disconnect returned %v after %s", err, time.Since(start).Round(time.Millisecond))
			if err != nil && !errors.Is(err, hook.ErrNoSession) { // ErrNoSession: the hook ended it already
				t.Fatalf("Hook.Disconnect: %v", err)
			}
			testwait.For(t, liveness, "the wedged session gone after Hook.Disconnect", func() bool {
				cl, ok := e.server.Clients.Get(term.sn)
				return !hasSession(e.hook, term.sn) && (!ok || cl.Closed())
			})
		})
		t.Run(tc.name+"/takeover", func(t *testing.T) {
			t.Parallel()
			e, term := start(t, tc.tune, tc.setup)
			wedge(t, e, term, tc.withKey, tc.subscribe, encode(t, tc.packet(term.sn)))
			start := time.Now()
			c, code, err := dialRaw(t, e.addr, term.sn, term.username(), e.login(term, true), true, 30, liveness)
			if err != nil || code != 0 {
				t.Fatalf("the genuine terminal's login after a wedged session: 0x%02x %v", code, err)
			}
			t.Logf("the genuine terminal's CONNACK came after %s", time.Since(start).Round(time.Millisecond))
			if rc := c.subscribe("$m2m/"+term.sn+"/key", 0); rc >= 0x80 {
				t.Fatalf("subscribe: 0x%02x", rc)
			}
			if f := keyMessage(t, c, term); f[1] != "sk" {
				t.Fatalf("got %v, want sk", f)
			}
		})
	}
}

// TestUnsubscribedControlFloodBounded (SECURITY.md, attacks tried): a terminal
// that never subscribes to its key topic floods garbage control messages.
// Its session is closed, the hook keeps no memory for the refusals and the
// log stays small.
func TestUnsubscribedControlFloodBounded(t *testing.T) {
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), true)
	if code != 0 {
		t.Fatalf("login: 0x%02x", code)
	}
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	linesBefore := strings.Count(e.logs.String(), "\n")

	const messages = 50_000
	garbage := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: 5,
		TopicName: "$m2m/" + term.sn + "/ctl", Payload: []byte("garbage")}
	sent, outcome := flood(e, c, encode(t, garbage), messages, liveness)
	t.Logf("flood: %d garbage control messages, then %s", sent, outcome)

	// Wait until the broker has handled the flood: the session ended, or
	// every message was refused.
	closed := testwait.Until(liveness, func() bool {
		cl, ok := e.server.Clients.Get(term.sn)
		return !ok || cl.Closed()
	})
	testwait.Until(liveness, func() bool {
		return closed || e.counter("m2mguard_changes_total", "event", "refused") >= float64(sent)
	})
	refused := e.counter("m2mguard_changes_total", "event", "refused")

	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	lines := strings.Count(e.logs.String(), "\n") - linesBefore
	t.Logf("%d refusals; heap after GC grew by %d KiB; %d log lines", int(refused), grown/1024, lines)

	if !closed || hasSession(e.hook, term.sn) {
		t.Errorf("the session is still open after %d garbage control messages", sent)
	}
	if grown > 2<<20 {
		t.Errorf("the heap grew by %d KiB after GC, want < 2 MiB", grown/1024)
	}
	if lines > 100 {
		t.Errorf("%d log lines for one flooding session, want <= 100", lines)
	}
}

// TestResetBeforeConnackLeavesNoSession (SECURITY.md, attacks tried): valid
// CONNECTs each followed at once by a TCP reset, before the CONNACK is
// written (mochi then never calls OnDisconnect), leave no session behind:
// none listed, the gauge back to 0, no client entry for clean sessions.
func TestResetBeforeConnackLeavesNoSession(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	resetAfterConnect := func(clean bool) {
		conn, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		pk := packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: clean, Keepalive: 30,
				ClientIdentifier: term.sn, UsernameFlag: true, Username: []byte(term.username()),
				PasswordFlag: true, Password: e.login(term, true)},
		}
		if !clean {
			pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 3600, true
		}
		var buf bytes.Buffer
		if err := pk.ConnectEncode(&buf); err != nil {
			t.Fatal(err)
		}
		conn.Write(buf.Bytes())
		conn.(*net.TCPConn).SetLinger(0) // close sends a RST
		conn.Close()
	}
	seen := func() float64 { return e.counter("m2mguard_logins_total") } // logins the hook has decided
	settled := func(clientEntryGone bool) bool {
		_, ok := e.server.Clients.Get(term.sn)
		return len(e.hook.Sessions()) == 0 && e.gauge("m2mguard_sessions") == 0 && (!clientEntryGone || !ok)
	}
	attempts := 0
	for _, phase := range []struct {
		clean    bool
		attempts int
	}{{true, 150}, {false, 50}} {
		for range phase.attempts {
			resetAfterConnect(phase.clean)
		}
		attempts += phase.attempts
		// Let the hook see every CONNECT that reached it (a reset may also
		// beat mochi's read of the CONNECT: then the hook never sees it).
		if !testwait.Until(liveness, func() bool { return seen() == float64(attempts) }) {
			t.Logf("the hook saw %v of %d CONNECTs", seen(), attempts)
		}
		if !testwait.Until(liveness, func() bool { return settled(phase.clean) }) {
			_, ok := e.server.Clients.Get(term.sn)
			t.Fatalf("after %d logins reset before their CONNACK (clean=%v): %d sessions listed, gauge %v, client entry kept: %v",
				phase.attempts, phase.clean, len(e.hook.Sessions()), e.gauge("m2mguard_sessions"), ok)
		}
	}
	accepted := e.counter("m2mguard_logins_total", "result", "accepted")
	// A genuine terminal (another one: a late reset login of the first
	// could take it over) gets in, listed once and counted once.
	other := e.register("A00MS8011390003S", codec.HS256)
	c, _ := loginWithKey(t, e, other, true)
	defer c.conn.Close()
	if got := e.hook.Sessions(); len(got) != 1 || got[0].SN != other.sn || e.gauge("m2mguard_sessions") != 1 {
		t.Fatalf("after a genuine login: sessions %+v, gauge %v", got, e.gauge("m2mguard_sessions"))
	}
	t.Logf("%v of %d reset logins were accepted before the reset", accepted, attempts)
}

// TestRefusalEventsRateLimited (SECURITY.md, attacks tried): a flood of bad
// CONNECTs logs at most EventRate login_refused events per second, then
// an events_suppressed summary with the number left out; the metric
// counts every refusal.
func TestRefusalEventsRateLimited(t *testing.T) {
	t.Parallel()
	const rate, attempts = 5, 300
	e := newEnv(t, func(o *hook.Options) { o.EventRate = rate })
	term := e.register("A00MS8011390002S", codec.HS256)
	unknown := term
	unknown.sn = "NOBODY"
	start := time.Now()
	for range attempts {
		c, _ := dialV5(t, e.addr, unknown.sn, unknown.username(), e.login(unknown, false), true)
		c.conn.Close()
	}
	elapsed := time.Since(start)
	if got := e.counter("m2mguard_logins_total", "result", "refused"); got != attempts {
		t.Fatalf("refusals counted: %v, want %d", got, attempts)
	}
	// logged counts the login_refused events in the log and the ones the
	// summaries say were left out.
	logged := func() (events, suppressed int) {
		for _, line := range strings.Split(e.logs.String(), "\n") {
			var ev struct {
				Event           string `json:"event"`
				SuppressedEvent string `json:"suppressed_event"`
				Count           int    `json:"count"`
			}
			if json.Unmarshal([]byte(line), &ev) != nil {
				continue
			}
			switch {
			case ev.Event == "login_refused":
				events++
			case ev.Event == "events_suppressed" && ev.SuppressedEvent == "login_refused":
				suppressed += ev.Count
			}
		}
		return events, suppressed
	}
	var events, suppressed int
	if !testwait.Until(liveness, func() bool { events, suppressed = logged(); return events+suppressed == attempts }) {
		t.Fatalf("%d login_refused events logged and %d reported suppressed, want %d in all", events, suppressed, attempts)
	}
	limit := rate + rate*int(elapsed/time.Second+1) // the burst, then rate per second begun
	t.Logf("%d refused logins in %s: %d logged, %d summed up as suppressed (limit %d)", attempts, elapsed.Round(time.Millisecond), events, suppressed, limit)
	if events > limit {
		t.Fatalf("%d login_refused events logged in %s, want <= %d", events, elapsed, limit)
	}
}

// TestStalledKeyWriteDropsClient (SECURITY.md, attacks tried): a terminal that
// stops reading while the platform has a key message for it (a change an
// operator starts) is dropped after WriteTimeout; the operator's call
// returns at once.
func TestStalledKeyWriteDropsClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(o *hook.Options) { o.WriteTimeout = 300 * time.Millisecond })
	term := e.register("A00MS8011390002S", codec.HS256)
	app, code := dialV5(t, e.addr, "dash-1", "dash", e.addApp("dash"), true)
	if code != 0 {
		t.Fatalf("application login: 0x%02x", code)
	}
	retained(t, app, "m2m/"+term.sn+"/down/big", bytes.Repeat([]byte("d"), 256<<10))
	// Subscribed to its key topic (with a session key, so a change can go
	// in ciphertext), the terminal stops reading and wedges its connection
	// with subscriptions to the large retained message.
	subscribe := encode(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 5,
		PacketID: 1, Filters: packets.Subscriptions{{Filter: "m2m/" + term.sn + "/down/#"}}})
	c := wedge(t, e, term, true, true, subscribe)
	defer c.conn.Close()
	var err error
	if !within(liveness, func() { _, err = e.hook.StartChange(t.Context(), term.sn, codec.WhatPwd) }) {
		t.Fatalf("StartChange for a wedged terminal did not return within %s", liveness)
	}
	if err != nil {
		t.Fatalf("StartChange: %v", err)
	}
	testwait.For(t, liveness, "a terminal that does not read its key message disconnected", func() bool {
		cl, ok := e.server.Clients.Get(term.sn)
		return !ok || cl.Closed()
	})
	if !strings.Contains(e.logs.String(), `"reason":"key-write-stalled"`) {
		t.Fatal("no session_ended event with reason key-write-stalled")
	}
}

// TestControlFloodWithRelogins is the documented run of defect 8 (issue
// 14): for M2MGUARD_FLOOD_SECONDS, a terminal with valid credentials
// floods garbage control messages without subscribing to its key topic,
// and logs in again each time the platform closes its session. Every
// session ends after MaxControlRefusals refusals; the log grows with the
// logins, not with the messages; no session is left behind.
func TestControlFloodWithRelogins(t *testing.T) {
	seconds, err := strconv.Atoi(os.Getenv("M2MGUARD_FLOOD_SECONDS"))
	if err != nil || seconds <= 0 {
		t.Skip("documented run: set M2MGUARD_FLOOD_SECONDS (e.g. 9)")
	}
	e := newEnv(t, nil)
	term := e.register("A00MS8011390002S", codec.HS256)
	e.secrets = nil // the log grows large: skip the secret scan (every other test runs it)
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	t.Logf("before: RSS %s, heap after GC %d KiB", vmRSS(), ms.HeapAlloc/1024)
	packet := encode(t, garbageControl(term.sn))
	stop := time.Now().Add(time.Duration(seconds) * time.Second)
	logins, sent := 0, 0
	for time.Now().Before(stop) {
		c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), true)
		if code != 0 {
			t.Fatalf("login %d: 0x%02x", logins+1, code)
		}
		logins++
		n, _ := flood(e, c, packet, 1_000_000, time.Second)
		sent += n
		c.conn.Close()
	}
	if !testwait.Until(liveness, func() bool { return len(e.hook.Sessions()) == 0 }) {
		t.Errorf("%d sessions left", len(e.hook.Sessions()))
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	refused := e.counter("m2mguard_changes_total", "event", "refused")
	lines := strings.Count(e.logs.String(), "\n")
	t.Logf("after %d s: %d logins, %d garbage control messages written, %v refused; RSS %s, heap after GC %d KiB, log %d KiB in %d lines",
		seconds, logins, sent, refused, vmRSS(), ms.HeapAlloc/1024, len(e.logs.String())/1024, lines)
	if refused > float64(8*logins) {
		t.Errorf("%v refusals for %d sessions, want <= 8 each", refused, logins)
	}
}

// vmRSS is the process's resident set size, from /proc (Linux).
func vmRSS() string {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return "?"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			return strings.TrimSpace(rest)
		}
	}
	return "?"
}
