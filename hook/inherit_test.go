package hook_test

import (
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/hooks/storage/bolt"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Sessions stay with their owner, and nothing leaves a session outside its
// reach (SECURITY.md, "Sessions stay with their owner").

// TestAppClientIDTakeover (defect 7): application narrow, which may read
// one terminal only, connects with application dash's ClientID. It must
// neither kick dash's live session nor inherit dash's persistent one with
// another terminal's data queued in it; it is refused as a wrong password
// is, and dash keeps its session and its data.
func TestAppClientIDTakeover(t *testing.T) {
	t.Parallel()
	for _, live := range []bool{true, false} {
		name := "dash offline"
		if live {
			name = "dash online"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			termA := e.register("TERMA", codec.HS256)
			dashPW := e.addApp("dash")
			narrowPW := e.addAppReach("narrow", []string{"m2m/TERMB/up/#"})
			dash, code := dialV5(t, e.addr, "dash-1", "dash", dashPW, false)
			if code != 0 {
				t.Fatalf("dash: CONNACK 0x%02x", code)
			}
			if rc := dash.subscribe("m2m/+/up/#", 1); rc >= 0x80 {
				t.Fatalf("dash subscribe: 0x%02x", rc)
			}
			if !live {
				dash.conn.Close()
				e.awaitOffline("dash-1")
				ca, _ := dialV5(t, e.addr, termA.sn, termA.username(), e.login(termA, false), true)
				if rc := ca.publish("m2m/TERMA/up/temp", []byte("for-dash"), 1); rc != 0 {
					t.Fatalf("terminal publish: 0x%02x", rc)
				}
				testwait.For(t, 10*time.Second, "TERMA's message queued for dash-1", func() bool { return e.queued("dash-1") == 1 })
			}

			thief, code := dialV5(t, e.addr, "dash-1", "narrow", narrowPW, false)
			if code != v5BadCredentials {
				if pk, err := thief.nextPublish(time.Second); err == nil {
					t.Errorf("narrow received %q on %s from dash's session", pk.Payload, pk.TopicName)
				}
				t.Fatalf("narrow with dash's ClientID: CONNACK 0x%02x, want 0x86 as for a wrong password", code)
			}
			if got := e.counter("m2mguard_logins_total", "result", "refused", "reason", "foreign-client-id"); got != 1 {
				t.Errorf("refusals with reason foreign-client-id: %v, want 1", got)
			}

			if live {
				// dash's connection is still up: a round trip works.
				if rc := dash.subscribe("m2m/TERMA/up/temp", 1); rc >= 0x80 {
					t.Fatalf("dash after the attempt: SUBACK 0x%02x", rc)
				}
				return
			}
			// dash resumes its session and gets its data.
			dash2, code := dialV5(t, e.addr, "dash-1", "dash", dashPW, false)
			if code != 0 {
				t.Fatalf("dash resumes: CONNACK 0x%02x", code)
			}
			if pk, err := dash2.nextPublish(5 * time.Second); err != nil || string(pk.Payload) != "for-dash" {
				t.Fatalf("dash's queued message: %q (%v), want for-dash", pk.Payload, err)
			}
		})
	}
}

// TestAppClientIDRule: an application's ClientID is its name, its name
// followed by '-' and anything, or empty (assigned by the broker). Every
// other ClientID is refused with the CONNACK of a wrong password, under
// both protocol versions; ClientIDs that are serial numbers stay the
// terminals'.
func TestAppClientIDRule(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	pws := map[string][]byte{}
	for _, name := range []string{"dash", "dash.east", "fleet_ops", "narrow"} {
		pws[name] = e.addApp(name)
	}
	tests := []struct {
		clientID, app string
		ok            bool
	}{
		{"dash-1", "dash", true},
		{"dash-", "dash", true},
		{"dash-x-y", "dash", true},
		{"", "dash", true}, // the broker assigns one
		{"dash.east", "dash.east", true},
		{"dash.east-7", "dash.east", true},
		{"fleet_ops", "fleet_ops", true},
		{"dash.east-7", "dash", false},
		{"dashboard-1", "dash", false},
		{"narrow-1", "dash", false},
		{"dash-1", "narrow", false},
		{"Dash-1", "dash", false},
		{"x-dash-1", "dash", false},
		{"dash", "dash", false}, // a valid serial number: a terminal's
	}
	for _, tc := range tests {
		code5 := byte(0xff)
		if c, code := dialV5(t, e.addr, tc.clientID, tc.app, pws[tc.app], true); code == 0 {
			c.conn.Close()
			code5 = 0
		} else {
			code5 = code
		}
		_, code3 := e.pahoConnect(tc.clientID, tc.app, pws[tc.app], true, nil)
		if tc.ok && (code5 != 0 || code3 != 0) || !tc.ok && (code5 != v5BadCredentials || code3 != v3NotAuthorized) {
			t.Errorf("application %s as ClientID %q: CONNACK 0x%02x (MQTT 5), %d (3.1.1); want allowed=%v", tc.app, tc.clientID, code5, code3, tc.ok)
		}
	}
	if !strings.Contains(e.logs.String(), `"reason":"foreign-client-id"`) {
		t.Error("no login_refused event with reason foreign-client-id")
	}
}

// TestInheritedStateOutsideReach (defect 7): an application's reach is
// narrowed while its persistent session holds messages it may no longer
// read (queued while it was offline, or sent and not yet acknowledged
// while it was online). When it resumes the session it receives only what
// its new reach allows, and the subscription beyond it is gone.
func TestInheritedStateOutsideReach(t *testing.T) {
	t.Parallel()
	for _, live := range []bool{false, true} {
		name := "queued while offline"
		if live {
			name = "unacknowledged while online"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			termA := e.register("TERMA", codec.HS256)
			termB := e.register("TERMB", codec.HS256)
			pw := e.addApp("dash")
			dash, code := dialV5(t, e.addr, "dash-1", "dash", pw, false)
			if code != 0 {
				t.Fatalf("dash: CONNACK 0x%02x", code)
			}
			if rc := dash.subscribe("m2m/+/up/#", 1); rc >= 0x80 {
				t.Fatalf("dash subscribe: 0x%02x", rc)
			}
			if !live {
				dash.conn.Close()
				e.awaitOffline("dash-1")
			}
			for _, term := range []specTerminal{termA, termB} {
				c, _ := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true)
				if rc := c.publish("m2m/"+term.sn+"/up/temp", []byte("from-"+term.sn), 1); rc != 0 {
					t.Fatalf("%s publish: 0x%02x", term.sn, rc)
				}
			}
			if live {
				// The raw client does not acknowledge: both stay in flight.
				for range 2 {
					if _, err := dash.nextPublish(5 * time.Second); err != nil {
						t.Fatalf("dash online: %v", err)
					}
				}
			}
			testwait.For(t, 10*time.Second, "two messages in dash-1's session", func() bool { return e.queued("dash-1") == 2 })

			// The operator narrows dash to terminal B.
			if _, err := e.svc.AddApp(t.Context(), keysvc.AddAppRequest{Name: "dash", Password: pw,
				Subscribe: []string{"m2m/TERMB/up/#"}}); err != nil {
				t.Fatal(err)
			}
			dash2, code := dialV5(t, e.addr, "dash-1", "dash", pw, false)
			if code != 0 {
				t.Fatalf("dash resumes: CONNACK 0x%02x", code)
			}
			// mochi resends the session's messages before it reads a
			// packet: all of them arrive before this SUBACK. (mochi keeps
			// one packet-id space per session for both directions: the
			// client's ids start above those in flight.)
			dash2.id = 1000
			if rc := dash2.subscribe("m2m/TERMB/up/#", 1); rc >= 0x80 {
				t.Fatalf("dash subscribe within its new reach: 0x%02x", rc)
			}
			var got []string
			for _, pk := range dash2.held {
				if pk.FixedHeader.Type == packets.Publish {
					got = append(got, string(pk.Payload))
				}
			}
			if len(got) != 1 || got[0] != "from-TERMB" {
				t.Errorf("resumed session received %q, want only [from-TERMB]", got)
			}
			if sub, ok := e.server.Topics.Subscribers("m2m/TERMA/up/temp").Subscriptions["dash-1"]; ok {
				t.Errorf("dash-1 is still subscribed beyond its reach: %q", sub.Filter)
			}
			if cl, ok := e.server.Clients.Get("dash-1"); ok {
				if _, ok := cl.State.Subscriptions.Get("m2m/+/up/#"); ok {
					t.Error("the resumed session still lists m2m/+/up/#")
				}
			}
		})
	}
}

// TestInheritedStateOutsideReachAfterRestart: with mochi's storage hook
// (bolt), a message the sieve dropped is gone from the store as well, and
// after a restart the session that comes back from the store is sieved
// again when it is resumed.
func TestInheritedStateOutsideReachAfterRestart(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "mochi.bolt")
	var store boltWithIDs
	withStore := func(o *hook.Options) {
		store = boltWithIDs{new(bolt.Hook)}
		if err := o.Server.AddHook(store, &bolt.Options{Path: path}); err != nil {
			t.Fatal(err)
		}
	}
	e := newEnv(t, withStore)
	termA := e.register("TERMA", codec.HS256)
	termB := e.register("TERMB", codec.HS256)
	pw := e.addApp("dash")
	dash, _ := dialV5(t, e.addr, "dash-1", "dash", pw, false)
	if rc := dash.subscribe("m2m/+/up/#", 1); rc >= 0x80 {
		t.Fatalf("dash subscribe: 0x%02x", rc)
	}
	dash.conn.Close()
	e.awaitOffline("dash-1")
	for _, term := range []specTerminal{termA, termB} {
		c, _ := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true)
		if rc := c.publish("m2m/"+term.sn+"/up/temp", []byte("from-"+term.sn), 1); rc != 0 {
			t.Fatalf("%s publish: 0x%02x", term.sn, rc)
		}
	}
	testwait.For(t, 10*time.Second, "two messages in dash-1's session", func() bool { return e.queued("dash-1") == 2 })
	if _, err := e.svc.AddApp(t.Context(), keysvc.AddAppRequest{Name: "dash", Password: pw,
		Subscribe: []string{"m2m/TERMB/up/#"}}); err != nil {
		t.Fatal(err)
	}

	// resume logs dash in again and returns what mochi resent to it
	// (the raw client acknowledges nothing: it all stays in flight).
	resume := func() []string {
		t.Helper()
		c, code := dialV5(t, e.addr, "dash-1", "dash", pw, false)
		if code != 0 {
			t.Fatalf("dash resumes: CONNACK 0x%02x", code)
		}
		c.id = 1000
		if rc := c.subscribe("m2m/TERMB/up/#", 1); rc >= 0x80 {
			t.Fatalf("dash subscribe: 0x%02x", rc)
		}
		var got []string
		for _, pk := range c.held {
			if pk.FixedHeader.Type == packets.Publish {
				got = append(got, string(pk.Payload))
			}
		}
		return got
	}
	if got := resume(); !slices.Equal(got, []string{"from-TERMB"}) {
		t.Fatalf("resumed session received %q, want [from-TERMB]", got)
	}
	msgs, err := store.StoredInflightMessages()
	if err != nil {
		t.Fatal(err)
	}
	var stored []string
	for _, m := range msgs {
		if m.Client == "dash-1" {
			stored = append(stored, string(m.Payload))
		}
	}
	if !slices.Equal(stored, []string{"from-TERMB"}) {
		t.Fatalf("the store holds %q in flight to dash-1, want [from-TERMB]", stored)
	}

	e.stop()
	e.start(e.svc.Store(), nil, withStore)
	if got := resume(); !slices.Equal(got, []string{"from-TERMB"}) {
		t.Fatalf("after a restart, the resumed session received %q, want [from-TERMB]", got)
	}
	if sub, ok := e.server.Topics.Subscribers("m2m/TERMA/up/temp").Subscriptions["dash-1"]; ok {
		t.Errorf("after a restart, dash-1 is subscribed beyond its reach: %q", sub.Filter)
	}
}

// boltWithIDs is mochi's bolt storage hook with a repair: in mochi v2.7.9
// it stores messages in flight without their packet id (their key has it),
// and a session restored from it cannot be resumed ("resend inflight:
// missing packet id").
type boltWithIDs struct{ *bolt.Hook }

func (b boltWithIDs) StoredInflightMessages() ([]storage.Message, error) {
	v, err := b.Hook.StoredInflightMessages()
	for i := range v {
		id, _ := strconv.ParseUint(v[i].ID[strings.LastIndexByte(v[i].ID, ':')+1:], 10, 16)
		v[i].PacketID = uint16(id)
	}
	return v, err
}

// TestKeylessTerminalGetsNoPlaintextDownlink (defect 11): a terminal whose
// record demands encryption logs in without a session key (it asked for
// none, or its bkd did not match). Its login succeeds, but it receives no
// downlink data in plaintext: not the message queued for its persistent
// session, not one published while it is connected, and its SUBSCRIBE to
// the downlink is refused. The queued message waits, and the next login
// with a session key receives it sealed.
func TestKeylessTerminalGetsNoPlaintextDownlink(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		login    func(e *env, term specTerminal) []byte
		takeover bool // the keyed login takes over the keyless connection instead of following it
	}{
		{"no session key requested", func(e *env, term specTerminal) []byte { return e.login(term, false) }, false},
		{"basic key mismatch", func(e *env, term specTerminal) []byte {
			wrong := term
			wrong.bk = make([]byte, 32)
			return e.login(wrong, true)
		}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			term := e.register("A00MS8011390002S", codec.HS256, func(r *keysvc.RegisterRequest) { r.RequireEncryption = true })
			down := "m2m/" + term.sn + "/down/cmd"
			app, _ := dialV5(t, e.addr, "dash-1", "dash", e.addApp("dash"), true)

			// A session with a key subscribes to the downlink and goes away.
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

			// The keyless login succeeds (SPEC section 5)...
			k, code := dialV5(t, e.addr, term.sn, term.username(), tc.login(e, term), false)
			if code != 0 {
				t.Fatalf("keyless login: CONNACK 0x%02x, want success", code)
			}
			// ...and whatever mochi resends arrives before this SUBACK.
			k.id = 1000 // above the packet ids in flight in the session
			if rc := k.subscribe("$m2m/"+term.sn+"/key", 0); rc >= 0x80 {
				t.Fatalf("key topic: 0x%02x", rc)
			}
			if rc := k.subscribe("m2m/"+term.sn+"/down/#", 1); rc != subAckRefused {
				t.Errorf("keyless SUBSCRIBE to the downlink: 0x%02x, want 0x87", rc)
			}
			if rc := app.publish(down, []byte("while-keyless"), 1); rc != 0 {
				t.Fatalf("application publish: 0x%02x", rc)
			}
			app.subscribe("m2m/+/up/#", 0) // a round trip: the broker has routed the publish
			if n := e.queued(term.sn); n != 0 {
				t.Errorf("%d messages in flight to the keyless connection, want 0", n)
			}
			for {
				pk, err := k.nextPublish(300 * time.Millisecond)
				if err != nil {
					break
				}
				if !strings.HasPrefix(pk.TopicName, "$m2m/") {
					t.Fatalf("keyless terminal received %q on %s in plaintext", pk.Payload, pk.TopicName)
				}
			}

			// The next login with a key receives the queued message, sealed.
			if !tc.takeover {
				k.conn.Close()
				e.awaitOffline(term.sn)
			}
			c2, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), false)
			if code != 0 {
				t.Fatalf("keyed login: CONNACK 0x%02x", code)
			}
			var ks []byte
			var sealed [][]byte
			for ks == nil || len(sealed) == 0 {
				pk, err := c2.nextPublish(5 * time.Second)
				if err != nil {
					t.Fatalf("waiting for the key and the queued downlink: %v", err)
				}
				if strings.HasPrefix(pk.TopicName, "$m2m/") {
					if ks, _, err = term.sessionKey(string(pk.Payload)); err != nil {
						t.Fatal(err)
					}
					e.secrets = append(e.secrets, ks)
				} else {
					sealed = append(sealed, pk.Payload)
				}
			}
			if _, plain, err := openDown(ks, down, sealed[0]); err != nil || string(plain) != "queued" {
				t.Fatalf("queued downlink under the new key: %q (%v)", plain, err)
			}
		})
	}
}

// addAppReach registers an application that may subscribe to subscribe only.
func (e *env) addAppReach(name string, subscribe []string) []byte {
	e.t.Helper()
	pw := []byte("app-password-" + name)
	if _, err := e.svc.AddApp(e.t.Context(), keysvc.AddAppRequest{Name: name, Password: pw, Subscribe: subscribe}); err != nil {
		e.t.Fatalf("add app: %v", err)
	}
	e.secrets = append(e.secrets, pw)
	return pw
}

// awaitOffline waits until the hook has seen clientID's connection end, so
// that messages for its persistent session are queued.
func (e *env) awaitOffline(clientID string) {
	e.t.Helper()
	testwait.For(e.t, 10*time.Second, clientID+" offline", func() bool {
		for _, s := range e.hook.Sessions() {
			if s.ClientID == clientID {
				return false
			}
		}
		return true
	})
}

// queued is the number of messages in flight in clientID's session.
func (e *env) queued(clientID string) int {
	cl, ok := e.server.Clients.Get(clientID)
	if !ok {
		return 0
	}
	return cl.State.Inflight.Len()
}
