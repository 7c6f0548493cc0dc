package hook_test

import (
	"slices"
	"sync"
	"testing"
	"time"

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
