package main

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"slices"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/codec"
)

// TestSessionsSurviveRestart (README, "Sessions across restarts"): a terminal with a persistent
// session subscribes to its downlink and goes offline; an application
// publishes 100 QoS 1 downlinks and a retained one; the broker is killed
// with SIGKILL (or stopped with SIGTERM) right after the last PUBACK and
// restarted on the same data directory. The terminal logs in again with a
// new session key and receives all 100, sealed under that key, and the
// retained message when it subscribes.
func TestSessionsSurviveRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	bin := buildBinary(t)
	for _, stop := range []string{"SIGKILL", "SIGTERM"} {
		t.Run(stop, func(t *testing.T) {
			t.Parallel()
			work := t.TempDir()
			p := startBinary(t, bin, work)
			term := newPahoTerminal(t, p.register(t, work, "S1"))
			appPW := p.addApp(t, work, "dash")

			c, ks1 := term.login(t, p.mqtt)
			term.subscribe(t, c, codec.DownTopic(term.sn, "#"))
			c.Disconnect(100)

			app := connectApp(t, p.mqtt, "dash-1", "dash", appPW)
			var want []string
			for i := range 100 {
				want = append(want, fmt.Sprintf("cmd-%03d", i))
				publishQoS1(t, app, codec.DownTopic(term.sn, "cmd"), want[i], false)
			}
			publishQoS1(t, app, codec.DownTopic(term.sn, "cfg"), "retained-cfg", true)
			if stop == "SIGKILL" {
				p.kill(t) // at once after the last PUBACK
			} else {
				app.Disconnect(100)
				p.terminate(t)
			}

			p = startBinary(t, bin, work)
			c, ks2 := term.login(t, p.mqtt)
			if bytes.Equal(ks1, ks2) {
				t.Fatal("the session after the restart has the session key of the one before")
			}
			// Read until all 100 are in: after a kill -9 the last
			// messages may come twice (QoS 1; sessionstore's journal).
			var got []string
			for received := 0; len(got) < 100; received++ {
				if received == 200 {
					t.Fatalf("200 downlinks read, %d distinct", len(got))
				}
				got = append(got, term.downlinks(t, ks2, codec.DownTopic(term.sn, "cmd"), 1)...)
				slices.Sort(got)
				got = slices.Compact(got)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("after the restart the terminal received %q, want the 100 sent before it", got)
			}
			term.subscribe(t, c, codec.DownTopic(term.sn, "cfg"))
			if r := term.downlinks(t, ks2, codec.DownTopic(term.sn, "cfg"), 1); r[0] != "retained-cfg" {
				t.Fatalf("retained message after the restart: %q", r)
			}
			c.Disconnect(100)
		})
	}
}

// TestSessionExpiryAcrossRestart: mqtt.session_expiry counts from the
// session's disconnect, not from the restart. Of two terminals' persistent
// sessions, the one that disconnected longer than the expiry before the
// restart is gone after it (clean session on resume, nothing queued); the
// one that disconnected just before the restart is there.
func TestSessionExpiryAcrossRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	const expiry = 4 * time.Second
	bin := buildBinary(t)
	work := t.TempDir()
	args := []string{"--mqtt-session-expiry", expiry.String()}
	p := startBinary(t, bin, work, args...)
	old := newPahoTerminal(t, p.register(t, work, "S1"))
	recent := newPahoTerminal(t, p.register(t, work, "S2"))
	appPW := p.addApp(t, work, "dash")

	c, _ := old.login(t, p.mqtt)
	old.subscribe(t, c, codec.DownTopic(old.sn, "#"))
	c.Disconnect(100)
	expired := time.Now().Add(expiry + time.Second)
	app := connectApp(t, p.mqtt, "dash-1", "dash", appPW)
	publishQoS1(t, app, codec.DownTopic(old.sn, "cmd"), "for-old", false)
	// The expiry of the first session must pass before the restart: this
	// waits for the clock, not for the broker.
	time.Sleep(time.Until(expired))
	c, _ = recent.login(t, p.mqtt)
	recent.subscribe(t, c, codec.DownTopic(recent.sn, "#"))
	c.Disconnect(100)
	publishQoS1(t, app, codec.DownTopic(recent.sn, "cmd"), "for-recent", false)
	app.Disconnect(100)
	p.terminate(t)

	p = startBinary(t, bin, work, args...)
	c, ks := recent.login(t, p.mqtt)
	if !c.(sessionPresent).present() {
		t.Fatal("the session that ended just before the restart is gone")
	}
	if got := recent.downlinks(t, ks, codec.DownTopic(recent.sn, "cmd"), 1); got[0] != "for-recent" {
		t.Fatalf("queued downlink of the recent session: %q", got)
	}
	c, _ = old.login(t, p.mqtt)
	if c.(sessionPresent).present() {
		t.Fatalf("the session that ended %s before the restart (expiry %s) was restored", expiry+time.Second, expiry)
	}
}

// pahoTerminal is an M2M1 terminal on a bare paho client (MQTT 3.1.1,
// persistent session), which keeps every message it receives: the
// reference client would hold at most 64 messages arriving before its
// session key.
type pahoTerminal struct {
	sn       string
	id       codec.Identity
	up, bk   []byte
	bkexp    uint32
	messages chan paho.Message
}

func newPahoTerminal(t *testing.T, b adminapi.Bundle) *pahoTerminal {
	t.Helper()
	bk, err := hex.DecodeString(b.BK)
	if err != nil {
		t.Fatal(err)
	}
	return &pahoTerminal{sn: b.SN, id: codec.Identity{SN: b.SN, IMEI: b.IMEI, IMSI: b.IMSI}, up: []byte(b.Up), bk: bk, bkexp: b.BKExp,
		messages: make(chan paho.Message, 1024)}
}

type sessionPresent interface{ present() bool }

type pahoSession struct {
	paho.Client
	sessionPresent bool
}

func (s pahoSession) present() bool { return s.sessionPresent }

// login connects with a fresh login token asking for a session key,
// subscribes to the key topic and returns the connection and the session
// key. Messages of the session that arrive before the key are kept.
func (term *pahoTerminal) login(t *testing.T, addr string) (paho.Client, []byte) {
	t.Helper()
	var n [8]byte
	rand.Read(n[:])
	l := codec.Login{Identity: term.id, Alg: codec.HS256, Flags: codec.FlagSessionKey, TS: uint32(time.Now().Unix()),
		Nonce: codec.ID(binary.BigEndian.Uint64(n[:])), BKD: codec.BasicKeyDigest(codec.HS256, term.bk, term.bkexp)}
	pw, err := l.Sign(term.up)
	if err != nil {
		t.Fatal(err)
	}
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(term.sn).SetUsername(l.Username()).
		SetPassword(string(pw)).SetCleanSession(false).SetAutoReconnect(false).SetConnectRetry(false).
		SetProtocolVersion(4).SetConnectTimeout(10 * time.Second).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { term.messages <- m })
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Fatalf("%s: login: %v", term.sn, tok.Error())
	}
	present := tok.(*paho.ConnectToken).SessionPresent()
	// mochi keeps one packet-id space per session for both directions: a
	// resumed session with messages in flight refuses paho's first packet
	// ids (0x91, identifier in use). The key topic is subscribed already.
	if code := term.trySubscribe(t, c, codec.KeyTopic(term.sn)); code >= 0x80 && !(present && code == 0x91) {
		t.Fatalf("subscribe the key topic: 0x%02x", code)
	}
	var early []paho.Message // data resent before the key: read later
	defer func() {
		for _, m := range early {
			term.messages <- m
		}
	}()
	for {
		m := term.next(t)
		if m.Topic() != codec.KeyTopic(term.sn) {
			early = append(early, m)
			continue
		}
		sk, err := codec.ParseControl(m.Payload())
		if err != nil || sk.Kind != codec.KindSK {
			t.Fatalf("%s: key topic: %q (%v)", term.sn, m.Payload(), err)
		}
		ks, err := codec.UnwrapSessionKey(term.bk, term.sn, sk.SID, sk.Wrapped)
		if err != nil {
			t.Fatalf("%s: unwrap the session key: %v", term.sn, err)
		}
		return pahoSession{c, present}, ks
	}
}

func (term *pahoTerminal) subscribe(t *testing.T, c paho.Client, filter string) {
	t.Helper()
	if r := term.trySubscribe(t, c, filter); r >= 0x80 {
		t.Fatalf("subscribe %s: 0x%02x", filter, r)
	}
}

// trySubscribe returns the SUBACK code.
func (term *pahoTerminal) trySubscribe(t *testing.T, c paho.Client, filter string) byte {
	t.Helper()
	tok := c.Subscribe(filter, 1, nil)
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe %s: %v", filter, tok.Error())
	}
	return tok.(*paho.SubscribeToken).Result()[filter]
}

func (term *pahoTerminal) next(t *testing.T) paho.Message {
	t.Helper()
	select {
	case m := <-term.messages:
		return m
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no message within 10 s", term.sn)
		return nil
	}
}

// downlinks reads n messages on topic and opens them with the session key
// ks (other messages are put back).
func (term *pahoTerminal) downlinks(t *testing.T, ks []byte, topic string, n int) []string {
	t.Helper()
	aead, err := codec.NewAEAD(ks)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	var other []paho.Message
	for len(got) < n {
		m := term.next(t)
		if m.Topic() != topic {
			other = append(other, m)
			continue
		}
		_, plain, err := codec.Open(nil, aead, codec.Downlink, topic, m.Payload())
		if err != nil {
			t.Fatalf("a downlink on %s does not open under the session key: %v", topic, err)
		}
		got = append(got, string(plain))
	}
	for _, m := range other {
		term.messages <- m
	}
	return got
}

func connectApp(t *testing.T, addr, clientID, name, password string) paho.Client {
	t.Helper()
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(clientID).SetUsername(name).SetPassword(password).
		SetCleanSession(true).SetAutoReconnect(false).SetProtocolVersion(4).SetConnectTimeout(10 * time.Second)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Fatalf("application login: %v", tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}

// publishQoS1 publishes and waits for the PUBACK.
func publishQoS1(t *testing.T, c paho.Client, topic, payload string, retain bool) {
	t.Helper()
	if tok := c.Publish(topic, 1, retain, payload); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish %s: %v", topic, tok.Error())
	}
}

// addApp registers an application over the admin API and returns its
// generated password.
func (p *process) addApp(t *testing.T, work, name string) string {
	t.Helper()
	a, err := adminClient(t, p.admin, work).AddApp(t.Context(), adminapi.AppRequest{Name: name})
	if err != nil || a.Password == "" {
		t.Fatalf("add app: %v", err)
	}
	return a.Password
}

// terminate stops the broker with SIGTERM and requires a clean exit.
func (p *process) terminate(t *testing.T) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, p.logs.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("no exit 30 s after SIGTERM\n%s", p.logs.String())
	}
}
