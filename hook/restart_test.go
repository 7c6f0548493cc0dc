package hook_test

import (
	"crypto/rand"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/hooks/storage/bolt"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/sessionstore"
)

// Sessions across restarts (README, "Sessions across restarts"): with a
// storage hook, what mochi restores at start must work with the hook as
// it did before the restart.

// storageHooks are the storage hooks the restart tests run with: mochi's
// own bolt hook (with the packet id repair) and the broker's session store.
func storageHooks(t *testing.T) []struct {
	name string
	add  func(o *hook.Options)
} {
	dir := t.TempDir()
	key := make([]byte, sessionstore.MasterKeySize)
	rand.Read(key)
	return []struct {
		name string
		add  func(o *hook.Options)
	}{
		{"mochi bolt", func(o *hook.Options) {
			store := boltWithIDs{new(bolt.Hook)}
			if err := o.Server.AddHook(store, &bolt.Options{Path: filepath.Join(dir, "mochi.bolt")}); err != nil {
				t.Fatal(err)
			}
			o.Storage = store
		}},
		{"sessionstore", func(o *hook.Options) {
			store, err := sessionstore.Open(filepath.Join(dir, "sessions.db"), sessionstore.Options{MasterKey: key, Server: o.Server, Logger: o.Logger})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { store.Close() })
			// Added before the M2M1 hook here (the harness adds that one
			// after tune): these tests publish no uplink the M2M1 hook
			// would open or drop. The broker adds it after.
			if err := o.Server.AddHook(store, nil); err != nil {
				t.Fatal(err)
			}
			o.Storage = store
		}},
	}
}

// TestRestoredSessionsReceiveQueuedMessages (restart defect 1): a
// terminal's and an application's persistent sessions, offline, survive a
// restart in the store; messages published after the restart must be
// queued for them, as before it, and the terminal's downlink must reach
// its next session sealed under that session's new key. Before the fix the
// hook knew nothing of the restored sessions: the per-recipient ACL refused
// every message for them and nothing was queued.
func TestRestoredSessionsReceiveQueuedMessages(t *testing.T) {
	t.Parallel()
	for _, st := range storageHooks(t) {
		t.Run(st.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, st.add)
			term := e.register("A00MS8011390002S", codec.HS256)
			other := e.register("B00MS8011390002S", codec.HS256)
			down := "m2m/" + term.sn + "/down/cmd"
			pw := e.addApp("dash")

			c1, ks1 := loginWithKey(t, e, term, false)
			if rc := c1.subscribe("m2m/"+term.sn+"/down/#", 1); rc >= 0x80 {
				t.Fatalf("terminal subscribe: 0x%02x", rc)
			}
			c1.conn.Close()
			e.awaitOffline(term.sn)
			dash, _ := dialV5(t, e.addr, "dash-7", "dash", pw, false)
			if rc := dash.subscribe("m2m/+/up/#", 1); rc >= 0x80 {
				t.Fatalf("dash subscribe: 0x%02x", rc)
			}
			dash.conn.Close()
			e.awaitOffline("dash-7")

			e.stop()
			e.start(e.svc.Store(), nil, st.add)

			app, _ := dialV5(t, e.addr, "dash-1", "dash", pw, true)
			for _, p := range []string{"one", "two", "three"} {
				if rc := app.publish(down, []byte(p), 1); rc != 0 {
					t.Fatalf("application publish: 0x%02x", rc)
				}
			}
			testwait.For(t, 10*time.Second, "3 downlinks queued for the terminal's restored session", func() bool { return e.queued(term.sn) == 3 })
			tc, _ := dialV5(t, e.addr, other.sn, other.username(), e.login(other, false), true)
			if rc := tc.publish("m2m/"+other.sn+"/up/temp", []byte("21.5"), 1); rc != 0 {
				t.Fatalf("terminal publish: 0x%02x", rc)
			}
			testwait.For(t, 10*time.Second, "the uplink queued for the application's restored session", func() bool { return e.queued("dash-7") == 1 })

			// The terminal resumes with a new session key: the queued
			// downlink arrives sealed under it.
			c2, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), false)
			if code != 0 {
				t.Fatalf("resume: CONNACK 0x%02x", code)
			}
			ks2, got := receiveSealed(t, e, term, c2, down, 3)
			if slices.Equal(ks1, ks2) {
				t.Fatal("the resumed session got the session key of the one before the restart")
			}
			// (mochi resends a session's messages in no particular order
			// within the second they were created: Inflight.GetAll sorts on
			// Created, unix seconds, with an unstable sort.)
			if slices.Sort(got); !slices.Equal(got, []string{"one", "three", "two"}) {
				t.Fatalf("downlink after the restart: %q", got)
			}
			dash2, code := dialV5(t, e.addr, "dash-7", "dash", pw, false)
			if code != 0 {
				t.Fatalf("dash resumes: CONNACK 0x%02x", code)
			}
			if pk, err := dash2.nextPublish(5 * time.Second); err != nil || string(pk.Payload) != "21.5" {
				t.Fatalf("the application's queued uplink: %q (%v)", pk.Payload, err)
			}
		})
	}
}

// TestParkedDownlinkSurvivesRestart (restart defect 2): downlink queued
// for a terminal that must encrypt is held back while it is connected
// without a session key (parked). A restart at that moment must not lose
// it: the next login with a key receives it, sealed. Before the fix the
// store had lost it at the keyless login's takeover and nothing gave it
// back.
func TestParkedDownlinkSurvivesRestart(t *testing.T) {
	t.Parallel()
	for _, st := range storageHooks(t) {
		t.Run(st.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, st.add)
			term := e.register("A00MS8011390002S", codec.HS256, func(r *keysvc.RegisterRequest) { r.RequireEncryption = true })
			down := "m2m/" + term.sn + "/down/cmd"
			app, _ := dialV5(t, e.addr, "dash-1", "dash", e.addApp("dash"), true)

			c1, _ := loginWithKey(t, e, term, false)
			if rc := c1.subscribe("m2m/"+term.sn+"/down/#", 1); rc >= 0x80 {
				t.Fatalf("keyed subscribe: 0x%02x", rc)
			}
			c1.conn.Close()
			e.awaitOffline(term.sn)
			if rc := app.publish(down, []byte("queued"), 1); rc != 0 {
				t.Fatalf("application publish: 0x%02x", rc)
			}
			testwait.For(t, 10*time.Second, "the downlink queued", func() bool { return e.queued(term.sn) == 1 })
			k, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), false)
			if code != 0 {
				t.Fatalf("keyless login: CONNACK 0x%02x", code)
			}
			k.id = 1000
			if rc := k.subscribe("$m2m/"+term.sn+"/key", 0); rc >= 0x80 { // a round trip: the sieve has run
				t.Fatalf("key topic: 0x%02x", rc)
			}
			if n := e.queued(term.sn); n != 0 {
				t.Fatalf("%d messages in flight to the keyless connection, want 0 (parked)", n)
			}

			e.stop() // while the message is parked
			e.start(e.svc.Store(), nil, st.add)

			c2, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), false)
			if code != 0 {
				t.Fatalf("keyed login after the restart: CONNACK 0x%02x", code)
			}
			if _, got := receiveSealed(t, e, term, c2, down, 1); !slices.Equal(got, []string{"queued"}) {
				t.Fatalf("downlink after the restart: %q", got)
			}
		})
	}
}

// receiveSealed reads, from a terminal's resumed session, its key message
// (the session is subscribed to the key topic from before) and n downlink
// messages on topic, and returns the session key and the plaintexts.
func receiveSealed(t *testing.T, e *env, term specTerminal, c *v5Client, topic string, n int) ([]byte, []string) {
	t.Helper()
	var ks []byte
	var sealed [][]byte
	for ks == nil || len(sealed) < n {
		pk, err := c.nextPublish(5 * time.Second)
		if err != nil {
			t.Fatalf("waiting for the key and %d downlinks (%d so far): %v", n, len(sealed), err)
		}
		switch {
		case strings.HasPrefix(pk.TopicName, "$m2m/"):
			if ks, _, err = term.sessionKey(string(pk.Payload)); err != nil {
				t.Fatal(err)
			}
			e.secrets = append(e.secrets, ks)
		case pk.TopicName == topic:
			sealed = append(sealed, pk.Payload)
		default:
			t.Fatalf("unexpected message on %s", pk.TopicName)
		}
	}
	var got []string
	for _, env := range sealed {
		_, plain, err := openDown(ks, topic, env)
		if err != nil {
			t.Fatalf("a downlink does not open under the session's key: %v", err)
		}
		got = append(got, string(plain))
	}
	return ks, got
}

// TestRestoredSessionOfDeletedTerminal: a terminal deleted while the
// broker was down leaves a restored session that belongs to nobody:
// nothing is queued for it.
func TestRestoredSessionOfDeletedTerminal(t *testing.T) {
	t.Parallel()
	for _, st := range storageHooks(t) {
		t.Run(st.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, st.add)
			term := e.register("A00MS8011390002S", codec.HS256)
			c, _ := loginWithKey(t, e, term, false)
			if rc := c.subscribe("m2m/"+term.sn+"/down/#", 1); rc >= 0x80 {
				t.Fatalf("subscribe: 0x%02x", rc)
			}
			c.conn.Close()
			e.awaitOffline(term.sn)
			e.stop()
			if err := e.svc.Delete(t.Context(), term.sn); err != nil {
				t.Fatal(err)
			}
			e.start(e.svc.Store(), nil, st.add)
			app, _ := dialV5(t, e.addr, "dash-1", "dash", e.addApp("dash"), true)
			if rc := app.publish("m2m/"+term.sn+"/down/cmd", []byte("for nobody"), 1); rc != 0 {
				t.Fatalf("application publish: 0x%02x", rc)
			}
			app.subscribe("m2m/+/up/#", 0) // a round trip: the broker has routed the publish
			if n := e.queued(term.sn); n != 0 {
				t.Fatalf("%d messages queued for the deleted terminal's restored session", n)
			}
			if !strings.Contains(e.logs.String(), "restored_session_orphaned") {
				t.Error("no restored_session_orphaned event")
			}
		})
	}
}

// refRecorder is a SessionDirectory that remembers the last session
// started per ClientID, as a fleet's directory would.
type refRecorder struct {
	mu   sync.Mutex
	refs map[string]hook.SessionRef
}

func (r *refRecorder) SessionStarted(ref hook.SessionRef, _ hook.SessionInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.refs == nil {
		r.refs = map[string]hook.SessionRef{}
	}
	r.refs[ref.ClientID] = ref
}

func (r *refRecorder) SessionEnded(hook.SessionRef) {}

func (r *refRecorder) ref(clientID string) (hook.SessionRef, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ref, ok := r.refs[clientID]
	return ref, ok
}

// TestTakenOverSessionNotRestored (fleet mode with a session store): a
// login on another broker of the fleet takes a terminal's persistent
// session over (Hook.TakenOver, as package fleetlink calls it), whether
// the session here is live or offline; the hook discards it, with what
// was queued for it. A restart must not bring it back from the store: the
// terminal's session lives on the other broker, and a stale copy here
// would collect downlink for it until it expired. Before the fix the
// discarded session stayed in the store and came back at the restart.
func TestTakenOverSessionNotRestored(t *testing.T) {
	for _, st := range storageHooks(t) {
		t.Run(st.name, func(t *testing.T) {
			dir := &refRecorder{}
			tune := func(o *hook.Options) { st.add(o); o.Directory = dir }
			e := newEnv(t, tune)
			live := e.register("A00MS8011390002S", codec.HS256)
			offline := e.register("B00MS8011390002S", codec.HS256)
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

			ref, ok := dir.ref(live.sn)
			if !ok {
				t.Fatal("the directory was not told of the live session")
			}
			if !e.hook.TakenOver(ref) {
				t.Fatal("the live session was not taken over")
			}
			if !e.hook.TakenOver(hook.SessionRef{ClientID: offline.sn}) {
				t.Fatal("the offline session was not discarded")
			}
			for _, term := range []specTerminal{live, offline} {
				testwait.For(t, 10*time.Second, term.sn+"'s session discarded", func() bool { _, ok := e.server.Clients.Get(term.sn); return !ok })
			}

			e.stop()
			e.start(e.svc.Store(), nil, tune)
			for _, term := range []specTerminal{live, offline} {
				if _, ok := e.server.Clients.Get(term.sn); ok {
					t.Errorf("%s's session, taken over by another broker, was restored from the store", term.sn)
				}
			}
		})
	}
}
