package client_test

// Integration tests: the client against a real mochi broker with the
// platform hook and the key service (bbolt store) on a loopback port.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/mochifix"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/sms"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

type platformEnv struct {
	t    *testing.T
	svc  *keysvc.Service
	addr string
	tune func(*hook.Options)

	mu     sync.Mutex
	server *mochi.Server
	hook   *hook.Hook
	up     chan [2]string // topic, plaintext as applications see it
}

func newPlatformEnv(t *testing.T, tune func(*hook.Options)) *platformEnv {
	t.Helper()
	key := make([]byte, 32)
	rand.Read(key)
	store, err := boltstore.Open(filepath.Join(t.TempDir(), "m2mguard.db"), boltstore.Options{MasterKey: key, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	svc, err := keysvc.New(keysvc.Options{Store: store, AppHash: keysvc.AppHashParams{Time: 1, Memory: 1024}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	e := &platformEnv{t: t, svc: svc, addr: addr, tune: tune, up: make(chan [2]string, 64)}
	e.start()
	t.Cleanup(e.stop)
	return e
}

// start starts a broker with a fresh hook on the same address.
func (e *platformEnv) start() {
	e.t.Helper()
	srv := mochi.New(&mochi.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	opts := hook.Options{Registry: e.svc, Server: srv, Logger: slog.New(slog.DiscardHandler)}
	if e.tune != nil {
		e.tune(&opts)
	}
	h, err := hook.New(opts)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := srv.AddHook(h, nil); err != nil {
		e.t.Fatal(err)
	}
	var ln net.Listener
	if !testwait.Until(5*time.Second, func() bool { // the port may linger for a moment after a restart
		ln, err = net.Listen("tcp", e.addr)
		return err == nil
	}) {
		e.t.Fatal(err)
	}
	if err := srv.AddListener(listeners.NewNet("tcp", ln)); err != nil {
		e.t.Fatal(err)
	}
	if err := srv.Subscribe("m2m/+/up/#", 1, func(_ *mochi.Client, _ packets.Subscription, pk packets.Packet) {
		e.up <- [2]string{pk.TopicName, string(pk.Payload)}
	}); err != nil {
		e.t.Fatal(err)
	}
	go srv.Serve()
	e.mu.Lock()
	e.server, e.hook = srv, h
	e.mu.Unlock()
}

func (e *platformEnv) stop() {
	e.mu.Lock()
	srv := e.server
	e.mu.Unlock()
	mochifix.Close(srv, []string{"tcp"}, 10*time.Second) // mochi's Close can deadlock: mochi-mqtt/server#488
}

func (e *platformEnv) publishDown(sn, sub, text string) {
	e.t.Helper()
	e.mu.Lock()
	srv := e.server
	e.mu.Unlock()
	if err := srv.Publish(codec.DownTopic(sn, sub), []byte(text), false, 1); err != nil {
		e.t.Fatal(err)
	}
}

func (e *platformEnv) register(sn string, msisdn ...string) *keysvc.Terminal {
	e.t.Helper()
	req := keysvc.RegisterRequest{SN: sn, IMEI: "354494040518570", IMSI: "460020084678120", Alg: codec.HS256}
	if len(msisdn) > 0 {
		req.MSISDN = msisdn[0]
	}
	term, err := e.svc.Register(e.t.Context(), req)
	if err != nil {
		e.t.Fatal(err)
	}
	return term
}

func credsOf(k keysvc.Credentials) client.Credentials {
	return client.Credentials{Up: bytes.Clone(k.Up), UpExp: k.UpExp, Down: bytes.Clone(k.Down), DownExp: k.DownExp,
		BK: bytes.Clone(k.BK), BKExp: k.BKExp}
}

// evlog collects events; wait takes the oldest not yet taken event of a
// kind, so events that arrive in either order are not lost.
type evlog struct {
	ch      chan client.Event
	backlog *[]client.Event
}

func (l evlog) wait(t *testing.T, k client.EventKind) client.Event {
	t.Helper()
	for i, ev := range *l.backlog {
		if ev.Kind == k {
			*l.backlog = append((*l.backlog)[:i:i], (*l.backlog)[i+1:]...)
			return ev
		}
	}
	deadline := time.After(20 * time.Second)
	for {
		select {
		case ev := <-l.ch:
			if ev.Kind == k {
				return ev
			}
			*l.backlog = append(*l.backlog, ev)
		case <-deadline:
			t.Fatalf("no %s event", k)
		}
	}
}

func (e *platformEnv) newClient(term *keysvc.Terminal, rec *client.Record, sessionKey bool, mod ...func(*client.Config)) (*client.Client, evlog, chan string) {
	e.t.Helper()
	var store client.CredentialStore
	switch {
	case rec == nil:
		store = client.NewMemStore(&client.Record{Current: credsOf(term.Creds)})
	default:
		store = client.NewMemStore(rec)
	}
	for _, m := range mod {
		cfg := client.Config{Store: store}
		m(&cfg)
		store = cfg.Store
	}
	ev := evlog{ch: make(chan client.Event, 256), backlog: new([]client.Event)}
	data := make(chan string, 16)
	cfg := client.Config{
		Brokers: []string{"tcp://" + e.addr}, Identity: term.Identity(), Alg: term.Alg,
		Store: store, SessionKey: sessionKey,
		OnEvent:    func(x client.Event) { ev.ch <- x },
		OnData:     func(sub string, p []byte) { data <- sub + ":" + string(p) },
		KeyTimeout: 5 * time.Second, ConnectTimeout: 5 * time.Second, MaxReconnectInterval: 300 * time.Millisecond,
	}
	for _, m := range mod {
		m(&cfg)
	}
	c, err := client.New(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c, ev, data
}

func connect(t *testing.T, c *client.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
}

func (e *platformEnv) nextUp(t *testing.T) [2]string {
	t.Helper()
	select {
	case m := <-e.up:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no uplink at the application")
	}
	return [2]string{}
}

func nextData(t *testing.T, ch chan string) string {
	t.Helper()
	select {
	case d := <-ch:
		return d
	case <-time.After(10 * time.Second):
		t.Fatal("no downlink data")
	}
	return ""
}

// First login, session key, data both ways, a broker restart, and a
// session ended by the platform at exp: each new login gets a new key.
func TestHookLife(t *testing.T) {
	t.Parallel()
	e := newPlatformEnv(t, func(o *hook.Options) { o.SessionLifetime = time.Hour })
	term := e.register("LIFE0001")
	c, ev, data := e.newClient(term, nil, true)
	connect(t, c)
	k1 := ev.wait(t, client.EventSessionKey)
	ctx := t.Context()
	if err := c.Publish(ctx, "temp", []byte(`{"t":21.5}`), 1); err != nil {
		t.Fatal(err)
	}
	if m := e.nextUp(t); m[0] != "m2m/LIFE0001/up/temp" || m[1] != `{"t":21.5}` {
		t.Fatalf("application got %q", m)
	}
	e.publishDown("LIFE0001", "cmd", "reboot")
	if d := nextData(t, data); d != "cmd:reboot" {
		t.Fatalf("terminal got %q", d)
	}
	if got := c.Session(); !got.Encrypted || got.UplinkSeq != 1 {
		t.Fatalf("session %+v", got)
	}

	// The broker restarts: paho reconnects with a fresh login, new key.
	e.stop()
	ev.wait(t, client.EventConnectionLost)
	e.start()
	for r := ev.wait(t, client.EventConnected); !r.Reconnect; r = ev.wait(t, client.EventConnected) {
	}
	k2 := ev.wait(t, client.EventSessionKey)
	if k2.SID == k1.SID {
		t.Fatal("same session key after a restart")
	}
	if err := c.Publish(ctx, "temp", []byte("after-restart"), 1); err != nil {
		t.Fatal(err)
	}
	if m := e.nextUp(t); m[1] != "after-restart" {
		t.Fatalf("application got %q", m)
	}
}

func TestHookSessionEnd(t *testing.T) {
	t.Parallel()
	e := newPlatformEnv(t, func(o *hook.Options) { o.SessionLifetime = 2 * time.Second })
	term := e.register("EXP00001")
	c, ev, _ := e.newClient(term, nil, true)
	connect(t, c)
	k1 := ev.wait(t, client.EventSessionKey)
	ev.wait(t, client.EventConnectionLost) // the platform ends the session at exp
	k2 := ev.wait(t, client.EventSessionKey)
	if k1.SID == k2.SID {
		t.Fatal("same key in the next session")
	}
	if err := c.Publish(t.Context(), "x", []byte("y"), 1); err != nil {
		t.Fatal(err)
	}
	if m := e.nextUp(t); m[1] != "y" {
		t.Fatalf("application got %q", m)
	}
}

func TestHookRefused(t *testing.T) {
	t.Parallel()
	e := newPlatformEnv(t, nil)
	term := e.register("REFU0001")
	bad := credsOf(term.Creds)
	bad.Up = []byte("WrongPassword123")
	c, _, _ := e.newClient(term, &client.Record{Current: bad}, false)
	err := c.Connect(t.Context())
	var re *client.RefusedError
	if !errors.Is(err, client.ErrRefused) || !errors.As(err, &re) || re.Code != 0x05 {
		t.Fatalf("got %v", err)
	}
}

// A change whose ack was lost (or a kill between cfg and ack): the terminal
// holds the new values as pending; its next login with the new password
// commits the change on the platform, and locally.
func TestHookLostAckRecoveredByLogin(t *testing.T) {
	t.Parallel()
	e := newPlatformEnv(t, nil)
	term := e.register("LOST0001")
	ch, err := e.svc.StartChange(t.Context(), term.SN, keysvc.ChangeRequest{What: codec.WhatAll, Mode: codec.ModeCipher})
	if err != nil {
		t.Fatal(err)
	}
	n := ch.New
	rec := &client.Record{Current: credsOf(term.Creds), Pending: &client.Pending{RID: ch.RID, Mode: codec.ModeCipher,
		Params: codec.Params{What: codec.WhatAll, Up: n.Up, UpExp: n.UpExp, Down: n.Down, DownExp: n.DownExp, BK: n.BK, BKExp: n.BKExp}}}
	c, ev, _ := e.newClient(term, rec, true)
	connect(t, c)
	if got := ev.wait(t, client.EventChangeCommitted); got.RID != ch.RID {
		t.Fatalf("committed %s", got.RID)
	}
	ev.wait(t, client.EventSessionKey) // under the new bk
	now, err := e.svc.Get(t.Context(), term.SN)
	if err != nil {
		t.Fatal(err)
	}
	if now.Pending != nil || !bytes.Equal(now.Creds.Up, n.Up) {
		t.Fatal("platform did not commit")
	}
	if got := c.Record(); got.Pending != nil || !bytes.Equal(got.Current.BK, n.BK) {
		t.Fatal("client did not commit")
	}
}

// New values the platform never had (the change was dropped): the login
// with them is refused and the client falls back to the current ones.
func TestHookFallback(t *testing.T) {
	t.Parallel()
	e := newPlatformEnv(t, nil)
	term := e.register("FALL0001")
	rec := &client.Record{Current: credsOf(term.Creds), Pending: &client.Pending{RID: 0x99, Mode: codec.ModeCipher,
		Params: codec.Params{What: codec.WhatPwd, Up: []byte("NeverKnownUp0001"), UpExp: codec.Never, Down: []byte("NeverKnownDown01"), DownExp: codec.Never}}}
	c, ev, _ := e.newClient(term, rec, false)
	connect(t, c)
	if r := ev.wait(t, client.EventRefused); !r.UsedPending {
		t.Fatal("the new password was not tried first")
	}
	if r := ev.wait(t, client.EventConnected); r.UsedPending {
		t.Fatal("connected with the new password")
	}
	// The client sends the ack again; the platform does not know the rid
	// and says so: the pending values are discarded.
	if d := ev.wait(t, client.EventChangeDiscarded); d.RID != 0x99 {
		t.Fatalf("discarded %s", d.RID)
	}
	if c.Record().Pending != nil {
		t.Fatal("pending values kept")
	}
}

// checkInSync fails unless the platform and the terminal hold the same
// current credentials and nothing pending.
func (e *platformEnv) checkInSync(t *testing.T, c *client.Client, sn string) {
	t.Helper()
	pt, err := e.svc.Get(t.Context(), sn)
	if err != nil {
		t.Fatal(err)
	}
	cr := c.Record()
	if pt.Pending != nil || cr.Pending != nil {
		t.Fatalf("still pending: platform %v, terminal %v", pt.Pending != nil, cr.Pending != nil)
	}
	if !bytes.Equal(pt.Creds.Up, cr.Current.Up) || !bytes.Equal(pt.Creds.Down, cr.Current.Down) || !bytes.Equal(pt.Creds.BK, cr.Current.BK) ||
		pt.Creds.UpExp != cr.Current.UpExp || pt.Creds.BKExp != cr.Current.BKExp {
		t.Fatal("platform and terminal hold different credentials")
	}
}

// A terminal-initiated change in ciphertext: chg, cfg, ack, done, the
// platform closes, the terminal logs in with the new values and gets a
// session key under the new basic key.
func TestHookCipherChange(t *testing.T) {
	t.Parallel()
	e := newPlatformEnv(t, nil)
	term := e.register("CIPH0001")
	c, ev, data := e.newClient(term, nil, true)
	connect(t, c)
	k1 := ev.wait(t, client.EventSessionKey)
	rid, err := c.RequestChange(t.Context(), codec.WhatAll, codec.ModeCipher)
	if err != nil {
		t.Fatal(err)
	}
	if got := ev.wait(t, client.EventChangeCommitted); got.RID != rid {
		t.Fatalf("committed %s, want %s", got.RID, rid)
	}
	for r := ev.wait(t, client.EventConnected); !r.Reconnect; r = ev.wait(t, client.EventConnected) {
	}
	if k2 := ev.wait(t, client.EventSessionKey); k2.SID == k1.SID {
		t.Fatal("no new session key")
	}
	e.checkInSync(t, c, term.SN)
	e.publishDown(term.SN, "cmd", "after-change")
	if d := nextData(t, data); d != "cmd:after-change" {
		t.Fatalf("terminal got %q", d)
	}
}

// A change by SMS through the test gateway: chg (sms), acc, the SMS from
// the platform's number, ack, done, new login.
func TestHookSMSChange(t *testing.T) {
	t.Parallel()
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	const msisdn = "8613800000001"
	e := newPlatformEnv(t, func(o *hook.Options) { o.SMS = &sms.HTTPSender{URL: gw.URL() + "/send", Retries: 2} })
	term := e.register("SMS00001", msisdn)
	c, ev, _ := e.newClient(term, nil, false, func(cfg *client.Config) {
		cfg.SMS = &client.GatewayInbox{URL: gw.URL(), MSISDN: msisdn, PollInterval: 20 * time.Millisecond}
		cfg.PlatformNumber = gw.From()
	})
	connect(t, c)
	rid, err := c.RequestChange(t.Context(), codec.WhatPwd, codec.ModeSMS)
	if err != nil {
		t.Fatal(err)
	}
	ev.wait(t, client.EventAwaitingSMS)
	if got := ev.wait(t, client.EventChangeReceived); got.RID != rid || got.Mode != codec.ModeSMS {
		t.Fatalf("received %+v", got)
	}
	ev.wait(t, client.EventChangeCommitted)
	for r := ev.wait(t, client.EventConnected); !r.Reconnect; r = ev.wait(t, client.EventConnected) {
	}
	e.checkInSync(t, c, term.SN)
}

// A platform-initiated change for an offline terminal goes out after its
// next login.
func TestHookPlatformInitiated(t *testing.T) {
	t.Parallel()
	e := newPlatformEnv(t, nil)
	term := e.register("PLAT0001")
	e.mu.Lock()
	h := e.hook
	e.mu.Unlock()
	ch, err := h.StartChange(t.Context(), term.SN, codec.WhatBK)
	if err != nil {
		t.Fatal(err)
	}
	c, ev, _ := e.newClient(term, nil, true)
	connect(t, c)
	if got := ev.wait(t, client.EventChangeCommitted); got.RID != ch.RID {
		t.Fatalf("committed %s", got.RID)
	}
	for r := ev.wait(t, client.EventConnected); !r.Reconnect; r = ev.wait(t, client.EventConnected) {
	}
	ev.wait(t, client.EventSessionKey)
	e.checkInSync(t, c, term.SN)
}

// failingStore stores the pending change, then fails as if the power went
// out before the ack left: the client never acks.
type failingStore struct{ client.CredentialStore }

func (f failingStore) SavePending(p client.Pending) error {
	if err := f.CredentialStore.SavePending(p); err != nil {
		return err
	}
	return errors.New("power cut")
}

// A kill between cfg and ack: the store holds the pending values, the
// platform holds the pending change, nobody acked. The terminal restarts
// and its login with the new password commits the change on both sides.
func TestHookKillBetweenCfgAndAck(t *testing.T) {
	t.Parallel()
	e := newPlatformEnv(t, nil)
	term := e.register("KILL0001")
	store := client.NewMemStore(&client.Record{Current: credsOf(term.Creds)})
	c, ev, _ := e.newClient(term, nil, true, func(cfg *client.Config) { cfg.Store = failingStore{store} })
	connect(t, c)
	go c.RequestChange(t.Context(), codec.WhatPwd, codec.ModeCipher)
	ev.wait(t, client.EventError) // storing "failed": no ack
	c.Close()
	if rec, _ := store.Load(); rec.Pending == nil {
		t.Fatal("nothing pending in the store")
	}
	if pt, _ := e.svc.Get(t.Context(), term.SN); pt.Pending == nil {
		t.Fatal("nothing pending on the platform")
	}
	// The terminal after the reboot.
	c2, ev2, _ := e.newClient(term, nil, true, func(cfg *client.Config) { cfg.Store = store })
	connect(t, c2)
	if got := ev2.wait(t, client.EventConnected); !got.UsedPending {
		t.Fatal("the login did not use the new password")
	}
	ev2.wait(t, client.EventChangeCommitted)
	e.checkInSync(t, c2, term.SN)
}
