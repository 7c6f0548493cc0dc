package client

import (
	"bytes"
	"encoding/hex"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
)

// The login vectors come out of the client's own credentials provider when
// its clock and randomness are the vectors'.
func TestVectorsLogin(t *testing.T) {
	vs := loadVectors(t)
	for _, alg := range []codec.Alg{codec.MD5, codec.HS256} {
		v := vs[alg.String()]
		for _, tc := range []struct {
			name       string
			sessionKey bool
			want       vectorLogin
		}{
			{"plain", false, v.LoginPlain},
			{"session-key", true, v.LoginSessionKey},
		} {
			t.Run(alg.String()+"/"+tc.name, func(t *testing.T) {
				rand := &nonces{}
				rand.push(0x0123456789abcdef)
				c, err := New(Config{
					Brokers: []string{"tcp://127.0.0.1:1"}, Identity: testID, Alg: alg,
					Store: NewMemStore(&Record{Current: testCreds()}), SessionKey: tc.sessionKey,
					Now: func() time.Time { return time.Unix(1764316800, 0) }, Rand: rand,
				})
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				id, user, pw, err := c.LoginCredentials()
				if err != nil {
					t.Fatal(err)
				}
				if id != tc.want.ClientID || user != tc.want.Username || pw != tc.want.Password {
					t.Errorf("got %s %s %s\nwant %s %s %s", id, user, pw, tc.want.ClientID, tc.want.Username, tc.want.Password)
				}
			})
		}
	}
}

// The whole life of the vectors through a real broker: login with flag 01,
// the sk vector, the uplink envelope vector (seq 1), the downlink envelope
// vector, chg, cfg, ack and done.
func TestVectorsSession(t *testing.T) {
	t.Parallel()
	vs := loadVectors(t)
	for _, alg := range []codec.Alg{codec.MD5, codec.HS256} {
		t.Run(alg.String(), func(t *testing.T) {
			v := vs[alg.String()]
			r := newRig(t, alg, nil, func(c *Config) { c.SessionKey = true; c.reconnectGrace = 200 * time.Millisecond })
			r.rand.push(0x0123456789abcdef)
			done := r.connect()
			r.p.waitSub(codec.KeyTopic(testID.SN))
			if got := r.p.gate.logins()[0]; got != v.LoginSessionKey.Password {
				t.Fatalf("login %s, want %s", got, v.LoginSessionKey.Password)
			}
			r.p.publishKey([]byte(v.SessionKey.Payload))
			if err := waitErr(t, done); err != nil {
				t.Fatal(err)
			}
			ev := r.ev.wait(t, EventSessionKey)
			if ev.SID != 0xfedcba9876543210 {
				t.Errorf("sid %s", ev.SID)
			}
			ctx := t.Context()
			if err := r.c.Publish(ctx, "temp", []byte(v.UplinkEnvelope.Plaintext), 1); err != nil {
				t.Fatal(err)
			}
			up := r.p.nextUp()
			if up.topic != v.UplinkEnvelope.Topic || hex.EncodeToString(up.payload) != v.UplinkEnvelope.PayloadHex {
				t.Errorf("uplink %s %x\nwant %s %s", up.topic, up.payload, v.UplinkEnvelope.Topic, v.UplinkEnvelope.PayloadHex)
			}
			env, _ := hex.DecodeString(v.DownEnvelope.PayloadHex)
			r.p.publishDown("cmd", env)
			d := r.data.next(t)
			if d.topic != "cmd" || string(d.payload) != v.DownEnvelope.Plaintext {
				t.Errorf("downlink %q %q", d.topic, d.payload)
			}
			// The same envelope again is a replay: dropped.
			r.p.publishDown("cmd", env)
			r.ev.wait(t, EventDropped)
			r.data.none(t)
			if r.c.Dropped()["replay"] != 1 {
				t.Errorf("dropped %v", r.c.Dropped())
			}

			// chg → cfg → ack → done.
			r.clock.Set(1764317000)
			r.rand.push(0xaa)
			rid := make(chan codec.ID, 1)
			go func() {
				id, err := r.c.RequestChange(ctx, codec.WhatAll, codec.ModeCipher)
				if err != nil {
					t.Error(err)
				}
				rid <- id
			}()
			chg := r.p.nextCtl()
			if got := string(chg.Encode()); got != v.ChangeRequest.Payload {
				t.Errorf("chg %s\nwant %s", got, v.ChangeRequest.Payload)
			}
			r.clock.Set(1764317010)
			r.rand.push(0xbb)
			r.p.publishKey([]byte(v.Cfg.Payload))
			if got := <-rid; got != 0x1111222233334444 {
				t.Errorf("rid %s", got)
			}
			ack := r.p.nextCtl()
			if got := string(ack.Encode()); got != v.Ack.Payload {
				t.Errorf("ack %s\nwant %s", got, v.Ack.Payload)
			}
			rec, _ := r.store.Load()
			if rec.Pending == nil || rec.Pending.RID != 0x1111222233334444 {
				t.Fatalf("pending not stored before the ack: %+v", rec.Pending)
			}
			r.p.publishKey([]byte(v.Done.Payload))
			r.ev.wait(t, EventChangeCommitted)
			rec, _ = r.store.Load()
			params, _ := codec.ParseParams([]byte(v.Cfg.Params))
			if rec.Pending != nil || !bytes.Equal(rec.Current.Up, params.Up) || !bytes.Equal(rec.Current.BK, params.BK) {
				t.Fatalf("not committed")
			}
			// The platform did not close the connection: the client logs in
			// again by itself, with the new values.
			r.ev.waitReconnect(t)
			logins := r.p.gate.logins()
			l, err := codec.ParseLogin(testID.SN, testID.Username(), []byte(logins[len(logins)-1]))
			if err != nil || !l.Verify(params.Up) {
				t.Fatalf("relogin not with the new up: %v", err)
			}
			if !codec.BasicKeyDigestEqual(l.BKD, alg, params.BK, params.BKExp) {
				t.Error("relogin bkd is not that of the new bk")
			}
		})
	}
}
