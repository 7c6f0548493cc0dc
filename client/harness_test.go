package client

// The harness: a real mochi broker on a loopback port with an allow-all
// authentication (a gate that records every CONNECT and can refuse some, to
// exercise the client's fallbacks), and a test "platform" that publishes
// codec-built control messages on $m2m/<sn>/key and reads $m2m/<sn>/ctl.
// It is not the platform hook: it only plays the other side of the wire.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/mochifix"
)

var testID = codec.Identity{SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120"}

func testCreds() Credentials {
	bk, _ := hex.DecodeString("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
	return Credentials{Up: []byte("vkwF2SJaQ7mXc4Lp"), UpExp: codec.Never, Down: []byte("Uo3aHCbGz8RtY2Nw"),
		DownExp: codec.Never, BK: bk, BKExp: codec.Never}
}

// gate is the broker's authentication in these tests: it accepts every
// CONNECT unless refuse says otherwise, records the passwords, and reports
// subscriptions.
type gate struct {
	mochi.HookBase
	mu        sync.Mutex
	passwords []string
	refuse    func(password []byte) bool
	subs      chan string
}

func (g *gate) ID() string { return "test-gate" }
func (g *gate) Provides(b byte) bool {
	return b == mochi.OnConnectAuthenticate || b == mochi.OnACLCheck || b == mochi.OnSubscribed
}

func (g *gate) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.passwords = append(g.passwords, string(pk.Connect.Password))
	return g.refuse == nil || !g.refuse(pk.Connect.Password)
}

func (g *gate) OnACLCheck(*mochi.Client, string, bool) bool { return true }

func (g *gate) OnSubscribed(cl *mochi.Client, pk packets.Packet, _ []byte) {
	for _, f := range pk.Filters {
		select {
		case g.subs <- f.Filter:
		default:
		}
	}
}

func (g *gate) setRefuse(f func([]byte) bool) {
	g.mu.Lock()
	g.refuse = f
	g.mu.Unlock()
}

func (g *gate) logins() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.passwords...)
}

// platform plays the platform side over a real broker.
type platform struct {
	t     *testing.T
	srv   *mochi.Server
	gate  *gate
	addr  string
	ctl   chan []byte // payloads on $m2m/<sn>/ctl
	up    chan upMsg  // payloads on m2m/<sn>/up/#
	id    codec.Identity
	alg   codec.Alg
	creds Credentials // the platform's view, to sign with
}

type upMsg struct {
	topic   string
	payload []byte
}

func newPlatform(t *testing.T, alg codec.Alg, extra ...listeners.Listener) *platform {
	t.Helper()
	srv := mochi.New(&mochi.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	g := &gate{subs: make(chan string, 64)}
	if err := srv.AddHook(g, nil); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddListener(listeners.NewNet("tcp", ln)); err != nil {
		t.Fatal(err)
	}
	ids := []string{"tcp"}
	for _, l := range extra {
		if err := srv.AddListener(l); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, l.ID())
	}
	p := &platform{t: t, srv: srv, gate: g, addr: ln.Addr().String(), ctl: make(chan []byte, 16),
		up: make(chan upMsg, 64), id: testID, alg: alg, creds: testCreds()}
	if err := srv.Subscribe(codec.CtlTopic(testID.SN), 1, func(_ *mochi.Client, _ packets.Subscription, pk packets.Packet) {
		p.ctl <- bytes.Clone(pk.Payload)
	}); err != nil {
		t.Fatal(err)
	}
	if err := srv.Subscribe("m2m/"+testID.SN+"/up/#", 2, func(_ *mochi.Client, _ packets.Subscription, pk packets.Packet) {
		p.up <- upMsg{pk.TopicName, bytes.Clone(pk.Payload)}
	}); err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { mochifix.Close(srv, ids, 10*time.Second) }) // mochi's Close can deadlock: mochi-mqtt/server#488
	return p
}

func (p *platform) url() string { return "tcp://" + p.addr }

// waitSub waits until a client subscribed to filter.
func (p *platform) waitSub(filter string) {
	p.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case f := <-p.gate.subs:
			if f == filter {
				return
			}
		case <-deadline:
			p.t.Fatalf("no subscription to %s", filter)
		}
	}
}

func (p *platform) publishKey(payload []byte) {
	p.t.Helper()
	if err := p.srv.Publish(codec.KeyTopic(p.id.SN), payload, false, 1); err != nil {
		p.t.Fatal(err)
	}
}

func (p *platform) publishDown(sub string, payload []byte) {
	p.t.Helper()
	if err := p.srv.Publish(codec.DownTopic(p.id.SN, sub), payload, false, 1); err != nil {
		p.t.Fatal(err)
	}
}

// sign signs m with the platform's current downlink password.
func (p *platform) sign(m codec.Control) []byte {
	p.t.Helper()
	b, err := m.Sign(p.id, p.creds.Down)
	if err != nil {
		p.t.Fatal(err)
	}
	return b
}

func (p *platform) nextCtl() codec.Control {
	p.t.Helper()
	select {
	case b := <-p.ctl:
		m, err := codec.ParseControl(b)
		if err != nil {
			p.t.Fatalf("ctl message: %v", err)
		}
		return m
	case <-time.After(10 * time.Second):
		p.t.Fatal("no ctl message")
	}
	return codec.Control{}
}

func (p *platform) nextUp() upMsg {
	p.t.Helper()
	select {
	case m := <-p.up:
		return m
	case <-time.After(10 * time.Second):
		p.t.Fatal("no uplink message")
	}
	return upMsg{}
}

// kick closes the terminal's connection from the broker side.
func (p *platform) kick() {
	p.t.Helper()
	cl, ok := p.srv.Clients.Get(p.id.SN)
	if !ok {
		p.t.Fatal("terminal not connected")
	}
	p.srv.DisconnectClient(cl, packets.ErrAdministrativeAction)
}

// clock is a settable Config.Now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock(unix int64) *clock { return &clock{t: time.Unix(unix, 0)} }
func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}
func (c *clock) Set(unix int64) {
	c.mu.Lock()
	c.t = time.Unix(unix, 0)
	c.mu.Unlock()
}

// nonces is a Config.Rand that hands out scripted 8-byte nonces, then
// counts up from 1<<32.
type nonces struct {
	mu   sync.Mutex
	next []uint64
	n    uint64
}

func (r *nonces) push(v ...uint64) {
	r.mu.Lock()
	r.next = append(r.next, v...)
	r.mu.Unlock()
}

func (r *nonces) Read(b []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(b) != 8 {
		return 0, io.ErrUnexpectedEOF
	}
	var v uint64
	if len(r.next) > 0 {
		v, r.next = r.next[0], r.next[1:]
	} else {
		r.n++
		v = 1<<32 + r.n
	}
	binary.BigEndian.PutUint64(b, v)
	return 8, nil
}

// events collects OnEvent calls.
type events struct {
	mu      sync.Mutex
	all     []Event
	ch      chan Event
	backlog []Event // received by wait, not taken yet (test goroutine only)
}

func newEvents() *events { return &events{ch: make(chan Event, 256)} }

func (e *events) on(ev Event) {
	e.mu.Lock()
	e.all = append(e.all, ev)
	e.mu.Unlock()
	e.ch <- ev
}

// wait returns the oldest event of kind k not taken yet, failing after a
// generous timeout. Events of other kinds are kept for later waits.
func (e *events) wait(t *testing.T, k EventKind) Event {
	t.Helper()
	for i, ev := range e.backlog {
		if ev.Kind == k {
			e.backlog = append(e.backlog[:i:i], e.backlog[i+1:]...)
			return ev
		}
	}
	deadline := time.After(15 * time.Second)
	for {
		select {
		case ev := <-e.ch:
			if ev.Kind == k {
				return ev
			}
			e.backlog = append(e.backlog, ev)
		case <-deadline:
			t.Fatalf("no %s event", k)
		}
	}
}

// waitReconnect waits for an EventConnected of an automatic reconnection.
func (e *events) waitReconnect(t *testing.T) Event {
	t.Helper()
	for {
		if ev := e.wait(t, EventConnected); ev.Reconnect {
			return ev
		}
	}
}

// data collects OnData calls.
type data struct{ ch chan upMsg }

func newData() *data { return &data{ch: make(chan upMsg, 64)} }
func (d *data) on(sub string, p []byte) {
	d.ch <- upMsg{sub, bytes.Clone(p)}
}

func (d *data) next(t *testing.T) upMsg {
	t.Helper()
	select {
	case m := <-d.ch:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no downlink data")
	}
	return upMsg{}
}

func (d *data) none(t *testing.T) {
	t.Helper()
	select {
	case m := <-d.ch:
		t.Fatalf("unexpected downlink data on %q", m.topic)
	case <-time.After(100 * time.Millisecond):
	}
}

type rig struct {
	t     *testing.T
	p     *platform
	c     *Client
	store CredentialStore
	ev    *events
	data  *data
	clock *clock
	rand  *nonces
}

// newRig starts a broker and a client (not connected). mod adjusts the
// config.
func newRig(t *testing.T, alg codec.Alg, rec *Record, mod func(*Config)) *rig {
	t.Helper()
	p := newPlatform(t, alg)
	if rec == nil {
		rec = &Record{Current: testCreds()}
	}
	r := &rig{t: t, p: p, store: NewMemStore(rec), ev: newEvents(), data: newData(), clock: newClock(1764316800), rand: &nonces{}}
	cfg := Config{
		Brokers: []string{p.url()}, Identity: testID, Alg: alg, Store: r.store,
		Now: r.clock.Now, Rand: r.rand, OnEvent: r.ev.on, OnData: r.data.on,
		KeyTimeout: 5 * time.Second, ConnectTimeout: 5 * time.Second, MaxReconnectInterval: 200 * time.Millisecond,
	}
	if os.Getenv("M2M_TEST_LOG") != "" {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	if mod != nil {
		mod(&cfg)
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r.c = c
	t.Cleanup(func() { c.Close() })
	return r
}

// connect connects in the background and returns a channel with the result.
func (r *rig) connect() chan error {
	ch := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(r.t.Context(), 20*time.Second)
		defer cancel()
		ch <- r.c.Connect(ctx)
	}()
	return ch
}

func waitErr(t *testing.T, ch chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("timed out")
	}
	return nil
}

// vectors of docs/SPEC.md, as in codec/testdata/vectors.json.
type vectorMsg struct {
	Topic           string `json:"topic"`
	Payload         string `json:"payload"`
	PayloadHex      string `json:"payload_hex"`
	Plaintext       string `json:"plaintext"`
	PlainSessionKey string `json:"plain_session_key"`
	Params          string `json:"params"`
}

type vectorLogin struct {
	ClientID string `json:"client_id"`
	Username string `json:"username"`
	Password string `json:"password"`
}

type vectorSet struct {
	LoginPlain      vectorLogin `json:"login_plain"`
	BKD             string      `json:"bkd"`
	LoginSessionKey vectorLogin `json:"login_session_key"`
	SessionKey      vectorMsg   `json:"session_key"`
	UplinkEnvelope  vectorMsg   `json:"uplink_envelope"`
	DownEnvelope    vectorMsg   `json:"downlink_envelope"`
	ChangeRequest   vectorMsg   `json:"change_request"`
	Cfg             vectorMsg   `json:"cfg"`
	AccSMS          vectorMsg   `json:"acc_sms"`
	SMSText         string      `json:"sms_text"`
	Ack             vectorMsg   `json:"ack"`
	Done            vectorMsg   `json:"done"`
}

func loadVectors(t *testing.T) map[string]vectorSet {
	t.Helper()
	b, err := os.ReadFile("../codec/testdata/vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	out := map[string]vectorSet{}
	for _, alg := range []string{"md5", "hs256"} {
		var v vectorSet
		if err := json.Unmarshal(raw[alg], &v); err != nil {
			t.Fatal(err)
		}
		out[alg] = v
	}
	return out
}
