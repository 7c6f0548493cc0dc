package hook_test

import (
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
)

// readyCalls records the calls of Options.OnDownlinkReady.
type readyCalls struct {
	mu  sync.Mutex
	sns []string
}

func (r *readyCalls) add(sn string) {
	r.mu.Lock()
	r.sns = append(r.sns, sn)
	r.mu.Unlock()
}

func (r *readyCalls) has(sn string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.sns, sn)
}

func (r *readyCalls) reset() {
	r.mu.Lock()
	r.sns = nil
	r.mu.Unlock()
}

// TestDownlinkReady: a terminal's session is ready for downlink data
// injected from outside (a fleet's routing) only once it is subscribed
// inside its downlink filter and, with a session key, its sk is written;
// OnDownlinkReady is called at that moment. A terminal that must encrypt
// and has no key is never ready.
func TestDownlinkReady(t *testing.T) {
	t.Parallel()
	calls := &readyCalls{}
	e := newEnv(t, func(o *hook.Options) { o.OnDownlinkReady = calls.add })

	t.Run("session key", func(t *testing.T) {
		term := e.register("DRKEY1", codec.HS256)
		c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), true)
		if code != 0 {
			t.Fatalf("login: 0x%02x", code)
		}
		// Subscribed to the downlink, but the sk is not written yet (the
		// key topic is not subscribed): not ready.
		if rc := c.subscribe("m2m/"+term.sn+"/down/#", 1); rc >= 0x80 {
			t.Fatalf("subscribe down: 0x%02x", rc)
		}
		if e.hook.DownlinkReady(term.sn) || calls.has(term.sn) {
			t.Fatal("ready before its session key was written")
		}
		if rc := c.subscribe("$m2m/"+term.sn+"/key", 1); rc >= 0x80 {
			t.Fatalf("subscribe key: 0x%02x", rc)
		}
		if _, err := c.nextPublish(5 * time.Second); err != nil {
			t.Fatalf("no sk: %v", err)
		}
		testwait.For(t, 5*time.Second, "OnDownlinkReady after the sk", func() bool { return calls.has(term.sn) })
		if !e.hook.DownlinkReady(term.sn) {
			t.Fatal("not ready after sk and the downlink subscription")
		}
		c.conn.Close()
		testwait.For(t, 5*time.Second, "not ready once disconnected", func() bool { return !e.hook.DownlinkReady(term.sn) })
	})

	t.Run("plaintext terminal", func(t *testing.T) {
		term := e.register("DRPLAIN1", codec.HS256)
		c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true)
		if code != 0 {
			t.Fatalf("login: 0x%02x", code)
		}
		if e.hook.DownlinkReady(term.sn) {
			t.Fatal("ready before any downlink subscription")
		}
		if rc := c.subscribe("m2m/"+term.sn+"/down/cmd", 1); rc >= 0x80 {
			t.Fatalf("subscribe down: 0x%02x", rc)
		}
		if !calls.has(term.sn) || !e.hook.DownlinkReady(term.sn) {
			t.Fatal("a terminal without key that may receive plaintext: not ready once subscribed")
		}
	})

	t.Run("must encrypt without key", func(t *testing.T) {
		calls.reset()
		term := e.register("DRENC1", codec.HS256, func(r *keysvc.RegisterRequest) { r.RequireEncryption = true })
		c, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true)
		if code != 0 {
			t.Fatalf("login: 0x%02x", code)
		}
		c.subscribe("m2m/"+term.sn+"/down/#", 1) // refused
		c.subscribe("$m2m/"+term.sn+"/key", 1)
		c.subscribe("m2m/+/up/#", 0) // a round trip
		if calls.has(term.sn) || e.hook.DownlinkReady(term.sn) {
			t.Fatal("a terminal that must encrypt and has no key is ready for downlink data")
		}
	})

	if e.hook.DownlinkReady("NOSUCH1") {
		t.Error("an unknown terminal is ready")
	}
}

// handed records the calls of Options.OnDownlinksDiscarded.
type handed struct {
	mu   sync.Mutex
	msgs map[string][]string // sn → payloads
}

func (h *handed) add(sn string, msgs []packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.msgs == nil {
		h.msgs = map[string][]string{}
	}
	for _, m := range msgs {
		h.msgs[sn] = append(h.msgs[sn], m.TopicName+" "+string(m.Payload))
	}
}

func (h *handed) of(sn string) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.msgs[sn])
}

// TestTakenOverHandsDownlinks: when a login on another broker takes a
// terminal's session over, the downlink data of the MQTT session the hook
// discards, unacknowledged or queued while offline, goes to
// Options.OnDownlinksDiscarded in plaintext, oldest first, once, so that
// a fleet can put it back on the terminal's way.
func TestTakenOverHandsDownlinks(t *testing.T) {
	t.Parallel()
	dir, got := &refRecorder{}, &handed{}
	e := newEnv(t, func(o *hook.Options) { o.Directory, o.OnDownlinksDiscarded = dir, got.add })
	live := e.register("HANDLIVE1", codec.HS256)
	offline := e.register("HANDOFF1", codec.HS256)
	var conns []*v5Client
	for _, term := range []specTerminal{live, offline} {
		c, _ := loginWithKey(t, e, term, false)
		if rc := c.subscribe("m2m/"+term.sn+"/down/#", 1); rc >= 0x80 {
			t.Fatalf("subscribe: 0x%02x", rc)
		}
		conns = append(conns, c)
	}
	conns[1].conn.Close()
	e.awaitOffline(offline.sn)
	app, _ := dialV5(t, e.addr, "dash-1", "dash", e.addApp("dash"), true)
	for _, term := range []specTerminal{live, offline} {
		for _, p := range []string{"first", "second"} {
			if rc := app.publish("m2m/"+term.sn+"/down/cmd", []byte(p), 1); rc != 0 {
				t.Fatalf("publish: 0x%02x", rc)
			}
		}
	}
	// The live terminal reads both and acknowledges neither.
	for range 2 {
		if _, err := conns[0].nextPublish(5 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
	testwait.For(t, 5*time.Second, "both queued for the offline session", func() bool { return e.queued(offline.sn) == 2 })

	ref, ok := dir.ref(live.sn)
	if !ok {
		t.Fatal("the directory was not told of the live session")
	}
	if !e.hook.TakenOver(ref) || !e.hook.TakenOver(hook.SessionRef{ClientID: offline.sn}) {
		t.Fatal("not taken over")
	}
	for _, term := range []specTerminal{live, offline} {
		want := []string{"m2m/" + term.sn + "/down/cmd first", "m2m/" + term.sn + "/down/cmd second"}
		testwait.For(t, 10*time.Second, term.sn+"'s downlinks handed", func() bool { return len(got.of(term.sn)) >= 2 })
		if g := got.of(term.sn); !slices.Equal(g, want) {
			t.Errorf("%s: handed %q, want %q", term.sn, g, want)
		}
	}
	// Taken over again (a late directory event): nothing more is handed.
	e.hook.TakenOver(hook.SessionRef{ClientID: offline.sn})
	for _, term := range []specTerminal{live, offline} {
		if g := got.of(term.sn); len(g) != 2 {
			t.Errorf("%s: handed %d messages in all, want 2", term.sn, len(g))
		}
	}
}
