package client

import (
	"bytes"
	"crypto/rand"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/sms"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

var (
	newPwdParams = codec.Params{What: codec.WhatPwd, Up: []byte("NewUpPassword001"), UpExp: codec.Never,
		Down: []byte("NewDownPasswd002"), DownExp: codec.Never}
	newBKParams = codec.Params{What: codec.WhatBK, BK: bytes.Repeat([]byte{7}, 32), BKExp: codec.Never}
)

// connectKeyed connects a client that wants a session key and gives it one.
func connectKeyed(t *testing.T, r *rig) (ks []byte) {
	t.Helper()
	done := r.connect()
	r.p.waitSub(codec.KeyTopic(testID.SN))
	ks = make([]byte, 32)
	rand.Read(ks)
	sid := codec.ID(42)
	w, err := codec.WrapSessionKey(r.p.creds.BK, testID.SN, sid, ks, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindSK, Alg: r.p.alg, TS: 1764316801, Exp: 1764403201, SID: sid, Wrapped: w}))
	if err := waitErr(t, done); err != nil {
		t.Fatal(err)
	}
	if !r.c.Session().Encrypted {
		t.Fatal("no session key")
	}
	return ks
}

// Every forged, tampered or misplaced downlink message is dropped, counted
// by reason, and has no effect.
func TestDropped(t *testing.T) {
	t.Parallel()
	r := newRig(t, codec.HS256, nil, func(c *Config) { c.SessionKey = true })
	ks := connectKeyed(t, r)
	aead, _ := codec.NewAEAD(ks)
	p := r.p
	wrongDown := []byte("WrongDownPasswd1")
	signWith := func(m codec.Control, pwd []byte) []byte {
		b, err := m.Sign(testID, pwd)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	tamper := func(b []byte) []byte {
		b = bytes.Clone(b)
		if b[len(b)-1] == '0' {
			b[len(b)-1] = '1'
		} else {
			b[len(b)-1] = '0'
		}
		return b
	}
	wrappedCfg, _ := codec.WrapParams(bytes.Repeat([]byte{9}, 32), testID.SN, 5, newPwdParams, rand.Reader)
	goodDone := p.sign(codec.Control{Kind: codec.KindDone, Alg: codec.HS256, TS: 1, RID: 77})
	envTopic := codec.DownTopic(testID.SN, "cmd")
	env1 := codec.Seal(nil, aead, codec.Downlink, 1, envTopic, []byte("one"))
	tests := []struct {
		name, reason string
		key          bool // on the key topic, else down/cmd
		payload      []byte
	}{
		{"forged err", "digest", true, signWith(codec.Control{Kind: codec.KindErr, Alg: codec.HS256, TS: 1, Code: codec.CodeBusy}, wrongDown)},
		{"tampered err", "digest", true, tamper(p.sign(codec.Control{Kind: codec.KindErr, Alg: codec.HS256, TS: 1, Code: codec.CodeBusy}))},
		{"forged cfg", "digest", true, signWith(codec.Control{Kind: codec.KindCfg, Alg: codec.HS256, TS: 1, RID: 5, Wrapped: wrappedCfg}, wrongDown)},
		{"cfg under another bk", "cfg-unwrap", true, p.sign(codec.Control{Kind: codec.KindCfg, Alg: codec.HS256, TS: 1, RID: 5, Wrapped: wrappedCfg})},
		{"done without change", "unknown-done", true, goodDone},
		{"wrong alg", "alg", true, signWith(codec.Control{Kind: codec.KindErr, Alg: codec.MD5, TS: 1, Code: codec.CodeBusy}, p.creds.Down)},
		{"uplink kind", "wrong-direction", true, signWith(codec.Control{Kind: codec.KindChg, Alg: codec.HS256, What: codec.WhatPwd, Mode: codec.ModeSMS, TS: 1, Nonce: 1}, p.creds.Up)},
		{"garbage", "malformed", true, []byte("M2M1.nope")},
		{"upper-case hex", "malformed", true, bytes.ToUpper(p.sign(codec.Control{Kind: codec.KindDone, Alg: codec.HS256, TS: 1, RID: 0xab}))},
		{"second sk", "second-sk", true, p.sign(codec.Control{Kind: codec.KindSK, Alg: codec.HS256, TS: 2, Exp: 3, SID: 43, Wrapped: mustWrapSK(t, p.creds.BK, 43)})},
		{"tampered envelope", "decrypt", false, tamper(env1)},
		{"plaintext in a keyed session", "decrypt", false, []byte("reboot")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := r.c.Dropped()[tc.reason]
			if tc.key {
				p.publishKey(tc.payload)
			} else {
				p.publishDown("cmd", tc.payload)
			}
			ev := r.ev.wait(t, EventDropped)
			if ev.Reason != tc.reason {
				t.Fatalf("dropped for %q, want %q", ev.Reason, tc.reason)
			}
			if got := r.c.Dropped()[tc.reason]; got != before+1 {
				t.Fatalf("count %d", got)
			}
		})
	}
	// After all that the session is intact: a good envelope is delivered,
	// its replay is not.
	p.publishDown("cmd", env1)
	if d := r.data.next(t); string(d.payload) != "one" {
		t.Fatalf("got %q", d.payload)
	}
	p.publishDown("cmd", env1)
	if ev := r.ev.wait(t, EventDropped); ev.Reason != "replay" {
		t.Fatalf("dropped for %q", ev.Reason)
	}
	rec, _ := r.store.Load()
	if rec.Pending != nil {
		t.Fatal("a dropped message changed the store")
	}
	if si := r.c.Session(); si.SID != 42 {
		t.Fatalf("session key replaced: %v", si.SID)
	}
}

func mustWrapSK(t *testing.T, bk []byte, sid codec.ID) string {
	w, err := codec.WrapSessionKey(bk, testID.SN, sid, bytes.Repeat([]byte{1}, 32), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// A fresh token on every connection attempt, automatic reconnections
// included; a new session gets a new key and uplink seq starts at 1 again.
func TestReconnectFreshLoginAndKey(t *testing.T) {
	t.Parallel()
	r := newRig(t, codec.MD5, nil, func(c *Config) { c.SessionKey = true })
	ks := connectKeyed(t, r)
	ctx := t.Context()
	for i := 0; i < 2; i++ {
		if err := r.c.Publish(ctx, "temp", []byte("x"), 1); err != nil {
			t.Fatal(err)
		}
	}
	aead, _ := codec.NewAEAD(ks)
	for want := uint64(1); want <= 2; want++ {
		m := r.p.nextUp()
		seq, _, err := codec.Open(nil, aead, codec.Uplink, m.topic, m.payload)
		if err != nil || seq != want {
			t.Fatalf("seq %d (%v), want %d", seq, err, want)
		}
	}
	r.clock.Set(1764316900)
	r.p.kick()
	r.ev.wait(t, EventConnectionLost)
	r.p.waitSub(codec.KeyTopic(testID.SN))
	logins := r.p.gate.logins()
	if len(logins) < 2 || logins[0] == logins[len(logins)-1] {
		t.Fatal("reconnect reused the login token")
	}
	l, err := codec.ParseLogin(testID.SN, testID.Username(), []byte(logins[len(logins)-1]))
	if err != nil || l.TS != 1764316900 || !l.WantsSessionKey() || !l.Verify(r.p.creds.Up) {
		t.Fatalf("reconnect login: %+v %v", l, err)
	}
	// Publish waits for the new session's key.
	pub := make(chan error, 1)
	go func() { pub <- r.c.Publish(ctx, "temp", []byte("y"), 1) }()
	ks2 := bytes.Repeat([]byte{5}, 32)
	w, _ := codec.WrapSessionKey(r.p.creds.BK, testID.SN, 99, ks2, rand.Reader)
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindSK, Alg: codec.MD5, TS: 1764316901, Exp: 1764403301, SID: 99, Wrapped: w}))
	if err := waitErr(t, pub); err != nil {
		t.Fatal(err)
	}
	aead2, _ := codec.NewAEAD(ks2)
	m := r.p.nextUp()
	seq, plain, err := codec.Open(nil, aead2, codec.Uplink, m.topic, m.payload)
	if err != nil || seq != 1 || string(plain) != "y" {
		t.Fatalf("new session envelope: seq %d %q %v", seq, plain, err)
	}
}

func TestConnectErrors(t *testing.T) {
	t.Parallel()
	t.Run("refused", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, codec.HS256, nil, nil)
		r.p.gate.setRefuse(func([]byte) bool { return true })
		err := waitErr(t, r.connect())
		var re *RefusedError
		if !errors.Is(err, ErrRefused) || !errors.As(err, &re) || re.Code != 0x05 {
			t.Fatalf("got %v", err)
		}
		if errors.Is(err, ErrUnreachable) {
			t.Fatal("refused is also unreachable")
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := ln.Addr().String()
		ln.Close()
		c, err := New(Config{Brokers: []string{"tcp://" + addr}, Identity: testID, Alg: codec.HS256,
			Store: NewMemStore(&Record{Current: testCreds()}), ConnectTimeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		err = c.Connect(t.Context())
		if !errors.Is(err, ErrUnreachable) || errors.Is(err, ErrRefused) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("publish before connect", func(t *testing.T) {
		c, _ := New(Config{Brokers: []string{"tcp://127.0.0.1:1"}, Identity: testID, Alg: codec.HS256,
			Store: NewMemStore(&Record{Current: testCreds()})})
		defer c.Close()
		if err := c.Publish(t.Context(), "x", nil, 0); !errors.Is(err, ErrNotConnected) {
			t.Fatalf("got %v", err)
		}
	})
}

func TestConfigErrors(t *testing.T) {
	good := Config{Brokers: []string{"tcp://x:1"}, Identity: testID, Alg: codec.MD5, Store: NewMemStore(&Record{Current: testCreds()})}
	for _, tc := range []struct {
		name string
		mod  func(*Config)
	}{
		{"no broker", func(c *Config) { c.Brokers = nil }},
		{"bad sn", func(c *Config) { c.Identity.SN = "a.b" }},
		{"no alg", func(c *Config) { c.Alg = 0 }},
		{"no store", func(c *Config) { c.Store = nil }},
		{"sms without number", func(c *Config) { c.SMS = &GatewayInbox{} }},
		{"bad auto mode", func(c *Config) { c.AutoBKChange = "fax" }},
		{"empty store", func(c *Config) { c.Store = NewMemStore(nil) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.mod(&cfg)
			if c, err := New(cfg); err == nil {
				c.Close()
				t.Fatal("accepted")
			}
		})
	}
}

// err bk-mismatch: an event, plaintext refused by default, and with
// AutoBKChange a chg for the basic key.
func TestErrBKMismatch(t *testing.T) {
	t.Parallel()
	r := newRig(t, codec.HS256, nil, func(c *Config) { c.SessionKey = true; c.AutoBKChange = codec.ModeSMS })
	done := r.connect()
	r.p.waitSub(codec.KeyTopic(testID.SN))
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindErr, Alg: codec.HS256, TS: 1, Code: codec.CodeBKMismatch}))
	if err := waitErr(t, done); err != nil {
		t.Fatal(err)
	}
	if ev := r.ev.wait(t, EventPlatformError); ev.ErrCode != codec.CodeBKMismatch {
		t.Fatalf("code %s", ev.ErrCode)
	}
	chg := r.p.nextCtl()
	if chg.Kind != codec.KindChg || chg.What != codec.WhatBK || chg.Mode != codec.ModeSMS || !chg.Verify(testID, r.p.creds.Up) {
		t.Fatalf("chg %+v", chg)
	}
	if err := r.c.Publish(t.Context(), "t", []byte("x"), 0); !errors.Is(err, ErrNoSessionKey) {
		t.Fatalf("publish: %v", err)
	}
	// The platform answers busy: RequestChange reports it.
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindErr, Alg: codec.HS256, TS: 2, Code: codec.CodeBusy}))
	r.ev.wait(t, EventPlatformError)
}

func TestRequestChangeBusy(t *testing.T) {
	t.Parallel()
	r := newRig(t, codec.MD5, nil, nil)
	if err := waitErr(t, r.connect()); err != nil {
		t.Fatal(err)
	}
	res := make(chan error, 1)
	go func() {
		_, err := r.c.RequestChange(t.Context(), codec.WhatPwd, codec.ModeCipher)
		res <- err
	}()
	r.p.nextCtl()
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindErr, Alg: codec.MD5, TS: 2, Code: codec.CodeBusy}))
	var pe *PlatformError
	if err := waitErr(t, res); !errors.As(err, &pe) || pe.Code != codec.CodeBusy {
		t.Fatalf("got %v", err)
	}
}

// A platform-initiated cipher change of the passwords: stored as pending
// before the ack, ack signed with the new up, done verified with the new
// down, then a login with the new values when the platform closes.
func TestPlatformInitiatedCipherChange(t *testing.T) {
	t.Parallel()
	r := newRig(t, codec.HS256, nil, nil)
	if err := waitErr(t, r.connect()); err != nil {
		t.Fatal(err)
	}
	w, _ := codec.WrapParams(r.p.creds.BK, testID.SN, 0x55, newPwdParams, rand.Reader)
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindCfg, Alg: codec.HS256, TS: 3, RID: 0x55, Wrapped: w}))
	ack := r.p.nextCtl()
	if ack.Kind != codec.KindAck || ack.RID != 0x55 || ack.BKD != "" || !ack.Verify(testID, newPwdParams.Up) {
		t.Fatalf("ack %+v", ack)
	}
	// done signed with the old down is forged.
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindDone, Alg: codec.HS256, TS: 4, RID: 0x55}))
	if ev := r.ev.wait(t, EventDropped); ev.Reason != "digest" {
		t.Fatalf("reason %s", ev.Reason)
	}
	r.p.creds = r.p.creds.Apply(newPwdParams)
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindDone, Alg: codec.HS256, TS: 4, RID: 0x55}))
	r.ev.wait(t, EventChangeCommitted)
	r.p.kick()
	r.ev.waitReconnect(t)
	logins := r.p.gate.logins()
	l, _ := codec.ParseLogin(testID.SN, testID.Username(), []byte(logins[len(logins)-1]))
	if !l.Verify(newPwdParams.Up) {
		t.Fatal("relogin not with the new up")
	}
}

// The SMS path: acc, then the SMS from the platform's number through the
// test gateway; SMS from another number or for another rid are ignored.
func TestSMSChange(t *testing.T) {
	t.Parallel()
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	const msisdn = "+8613800000001"
	r := newRig(t, codec.MD5, nil, func(c *Config) {
		c.SMS = &GatewayInbox{URL: gw.URL(), MSISDN: msisdn, PollInterval: 20 * time.Millisecond}
		c.PlatformNumber = gw.From()
	})
	if err := waitErr(t, r.connect()); err != nil {
		t.Fatal(err)
	}
	params := codec.Params{What: codec.WhatAll, Up: newPwdParams.Up, UpExp: 2000000000, Down: newPwdParams.Down,
		DownExp: 2000000000, BK: newBKParams.BK, BKExp: codec.Never}
	text := func(rid codec.ID) string {
		b, err := (&codec.SMS{SN: testID.SN, RID: rid, Params: params}).Encode()
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	res := make(chan codec.ID, 1)
	go func() {
		rid, err := r.c.RequestChange(t.Context(), codec.WhatAll, codec.ModeSMS)
		if err != nil {
			t.Error(err)
		}
		res <- rid
	}()
	if chg := r.p.nextCtl(); chg.Mode != codec.ModeSMS {
		t.Fatalf("chg %+v", chg)
	}
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindAcc, Alg: codec.MD5, TS: 5, RID: 0x66, Mode: codec.ModeSMS}))
	if rid := <-res; rid != 0x66 {
		t.Fatalf("rid %s", rid)
	}
	r.ev.wait(t, EventAwaitingSMS)
	gw.Inject("+19999999999", msisdn, text(0x66)) // wrong sender
	if ev := r.ev.wait(t, EventDropped); ev.Reason != "sms-sender" {
		t.Fatalf("reason %s", ev.Reason)
	}
	sender := &sms.HTTPSender{URL: gw.URL() + "/send"}
	if err := sender.Send(t.Context(), msisdn, text(0x67)); err != nil { // another rid
		t.Fatal(err)
	}
	if ev := r.ev.wait(t, EventDropped); ev.Reason != "sms-rid" {
		t.Fatalf("reason %s", ev.Reason)
	}
	if err := sender.Send(t.Context(), msisdn, text(0x66)); err != nil {
		t.Fatal(err)
	}
	ack := r.p.nextCtl()
	if ack.Kind != codec.KindAck || ack.RID != 0x66 || !ack.Verify(testID, params.Up) ||
		!codec.BasicKeyDigestEqual(ack.BKD, codec.MD5, params.BK, params.BKExp) {
		t.Fatalf("ack %+v", ack)
	}
	if rec, _ := r.store.Load(); rec.Pending == nil || rec.Pending.Mode != codec.ModeSMS {
		t.Fatal("not pending")
	}
	r.p.creds = r.p.creds.Apply(params)
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindDone, Alg: codec.MD5, TS: 6, RID: 0x66}))
	r.ev.wait(t, EventChangeCommitted)
	if rec, _ := r.store.Load(); !bytes.Equal(rec.Current.BK, params.BK) || rec.Current.UpExp != 2000000000 {
		t.Fatal("not committed")
	}
}

func pendingRecord(p codec.Params) *Record {
	return &Record{Current: testCreds(), Pending: &Pending{RID: 0x77, Params: p, Mode: codec.ModeCipher}}
}

// Lock-out safety with a password change pending: the new up is tried
// first; the broker refuses it, so the current one is used; the ack is sent
// again and unknown-rid discards the change.
func TestPendingRefusedFallsBack(t *testing.T) {
	t.Parallel()
	r := newRig(t, codec.HS256, pendingRecord(newPwdParams), nil)
	r.p.gate.setRefuse(func(pw []byte) bool {
		l, err := codec.ParseLogin(testID.SN, testID.Username(), pw)
		return err != nil || !l.Verify(testCreds().Up)
	})
	if err := waitErr(t, r.connect()); err != nil {
		t.Fatal(err)
	}
	if ev := r.ev.wait(t, EventRefused); !ev.UsedPending {
		t.Fatal("first login was not with the new password")
	}
	if ev := r.ev.wait(t, EventConnected); ev.UsedPending {
		t.Fatal("second login was not with the current password")
	}
	ack := r.p.nextCtl()
	if ack.Kind != codec.KindAck || ack.RID != 0x77 || !ack.Verify(testID, newPwdParams.Up) {
		t.Fatalf("ack %+v", ack)
	}
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindErr, Alg: codec.HS256, TS: 7, Code: codec.CodeUnknownRID}))
	r.ev.wait(t, EventChangeDiscarded)
	if rec, _ := r.store.Load(); rec.Pending != nil || !bytes.Equal(rec.Current.Up, testCreds().Up) {
		t.Fatal("not discarded")
	}
}

// A lost ack: the login with the pending new up is accepted (the platform
// commits on it) and the client commits too.
func TestLoginWithPendingCommits(t *testing.T) {
	t.Parallel()
	r := newRig(t, codec.MD5, pendingRecord(newPwdParams), nil)
	if err := waitErr(t, r.connect()); err != nil {
		t.Fatal(err)
	}
	ev := r.ev.wait(t, EventChangeCommitted)
	if ev.RID != 0x77 || !strings.Contains(ev.Reason, "login") {
		t.Fatalf("event %+v", ev)
	}
	l, _ := codec.ParseLogin(testID.SN, testID.Username(), []byte(r.p.gate.logins()[0]))
	if !l.Verify(newPwdParams.Up) {
		t.Fatal("login not with the new up")
	}
	if rec, _ := r.store.Load(); rec.Pending != nil || !bytes.Equal(rec.Current.Down, newPwdParams.Down) {
		t.Fatal("not committed")
	}
}

// A lost done for a basic-key change: the login carries the new bkd, the
// platform (which committed) answers with a session key under the new bk.
func TestPendingBKProbe(t *testing.T) {
	t.Parallel()
	t.Run("committed", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, codec.HS256, pendingRecord(newBKParams), nil)
		done := r.connect()
		r.p.waitSub(codec.KeyTopic(testID.SN))
		l, _ := codec.ParseLogin(testID.SN, testID.Username(), []byte(r.p.gate.logins()[0]))
		if !codec.BasicKeyDigestEqual(l.BKD, codec.HS256, newBKParams.BK, newBKParams.BKExp) {
			t.Fatal("login does not carry the new bkd")
		}
		w, _ := codec.WrapSessionKey(newBKParams.BK, testID.SN, 1, bytes.Repeat([]byte{3}, 32), rand.Reader)
		r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindSK, Alg: codec.HS256, TS: 1, Exp: 2, SID: 1, Wrapped: w}))
		if err := waitErr(t, done); err != nil {
			t.Fatal(err)
		}
		r.ev.wait(t, EventChangeCommitted)
		if rec, _ := r.store.Load(); !bytes.Equal(rec.Current.BK, newBKParams.BK) {
			t.Fatal("not committed")
		}
	})
	t.Run("kill between cfg and ack", func(t *testing.T) {
		// The pending change was stored but the ack never left: the
		// platform still has it pending, answers bk-mismatch, gets the ack
		// and sends done.
		r := newRig(t, codec.HS256, pendingRecord(newBKParams), nil)
		done := r.connect()
		r.p.waitSub(codec.KeyTopic(testID.SN))
		r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindErr, Alg: codec.HS256, TS: 1, Code: codec.CodeBKMismatch}))
		if err := waitErr(t, done); err != nil {
			t.Fatal(err)
		}
		ack := r.p.nextCtl()
		if ack.Kind != codec.KindAck || !codec.BasicKeyDigestEqual(ack.BKD, codec.HS256, newBKParams.BK, newBKParams.BKExp) {
			t.Fatalf("ack %+v", ack)
		}
		r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindDone, Alg: codec.HS256, TS: 2, RID: 0x77}))
		r.ev.wait(t, EventChangeCommitted)
	})
}

// A pending password change whose commit the client missed: any message
// that only the new downlink password verifies commits it.
func TestNewDownCommits(t *testing.T) {
	t.Parallel()
	r := newRig(t, codec.HS256, pendingRecord(newPwdParams), nil)
	r.p.gate.setRefuse(func(pw []byte) bool {
		l, _ := codec.ParseLogin(testID.SN, testID.Username(), pw)
		return l.Verify(newPwdParams.Up) // as if that login was lost
	})
	if err := waitErr(t, r.connect()); err != nil {
		t.Fatal(err)
	}
	r.p.nextCtl() // the re-sent ack
	r.p.creds = r.p.creds.Apply(newPwdParams)
	r.p.publishKey(r.p.sign(codec.Control{Kind: codec.KindErr, Alg: codec.HS256, TS: 9, Code: codec.CodeUnknownRID}))
	ev := r.ev.wait(t, EventChangeCommitted)
	if !strings.Contains(ev.Reason, "new downlink") {
		t.Fatalf("reason %q", ev.Reason)
	}
}

// Plain sessions: data both ways without envelopes.
func TestPlaintextSession(t *testing.T) {
	t.Parallel()
	r := newRig(t, codec.MD5, nil, nil)
	if err := waitErr(t, r.connect()); err != nil {
		t.Fatal(err)
	}
	if err := r.c.Publish(t.Context(), "a/b", []byte("hello"), 1); err != nil {
		t.Fatal(err)
	}
	if m := r.p.nextUp(); m.topic != codec.UpTopic(testID.SN, "a/b") || string(m.payload) != "hello" {
		t.Fatalf("got %s %q", m.topic, m.payload)
	}
	r.p.publishDown("x/y", []byte("cmd"))
	if d := r.data.next(t); d.topic != "x/y" || string(d.payload) != "cmd" {
		t.Fatalf("got %s %q", d.topic, d.payload)
	}
	if err := r.c.Publish(t.Context(), "a/#", nil, 0); err == nil {
		t.Fatal("wildcard accepted")
	}
}
