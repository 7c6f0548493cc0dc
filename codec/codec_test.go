package codec_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"strings"
	"testing"

	"github.com/m2mguard/m2mguard/codec"
)

var (
	testID   = codec.Identity{SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120"}
	testUp   = []byte("vkwF2SJaQ7mXc4Lp")
	testDown = []byte("Uo3aHCbGz8RtY2Nw")
	testBK   = bytes.Repeat([]byte{0x42}, 32)
)

const goodHS = "M2M1.hs256.00.1764316800.0123456789abcdef..d420e7ee6db454de6c208393c7c420420eaff12d881b2b1d83a20a9f08e740e9"

func TestParseLoginRefuses(t *testing.T) {
	digest64 := strings.Repeat("a", 64)
	tests := []struct {
		name, clientID, username, password string
		field                              string
		sentinel                           error
	}{
		{"too long", testID.SN, testID.Username(), strings.Repeat("x", 201), "password", codec.ErrTooLong},
		{"empty sn", "", testID.Username(), goodHS, "sn", codec.ErrMalformed},
		{"sn too long", "A00MS8011390002SX", testID.Username(), goodHS, "sn", codec.ErrMalformed},
		{"sn bad char", "A00-MS", testID.Username(), goodHS, "sn", codec.ErrMalformed},
		{"no colon", testID.SN, "354494040518570", goodHS, "username", codec.ErrMalformed},
		{"imei short", testID.SN, "3544940405185:460020084678120", goodHS, "imei", codec.ErrMalformed},
		{"imsi letter", testID.SN, "354494040518570:46002008467812x", goodHS, "imsi", codec.ErrMalformed},
		{"version", testID.SN, testID.Username(), "M2M2.hs256.00.1764316800.0123456789abcdef.." + digest64, "version", codec.ErrMalformed},
		{"alg", testID.SN, testID.Username(), "M2M1.sha1.00.1764316800.0123456789abcdef.." + digest64, "alg", codec.ErrMalformed},
		{"flags other bit", testID.SN, testID.Username(), "M2M1.hs256.02.1764316800.0123456789abcdef.." + digest64, "flags", codec.ErrMalformed},
		{"flags upper hex", testID.SN, testID.Username(), "M2M1.hs256.0A.1764316800.0123456789abcdef.." + digest64, "flags", codec.ErrMalformed},
		{"ts leading zero", testID.SN, testID.Username(), "M2M1.hs256.00.01764316800.0123456789abcdef.." + digest64, "ts", codec.ErrMalformed},
		{"ts sign", testID.SN, testID.Username(), "M2M1.hs256.00.+1764316800.0123456789abcdef.." + digest64, "ts", codec.ErrMalformed},
		{"ts overflow", testID.SN, testID.Username(), "M2M1.hs256.00.4294967296.0123456789abcdef.." + digest64, "ts", codec.ErrMalformed},
		{"nonce upper", testID.SN, testID.Username(), "M2M1.hs256.00.1764316800.0123456789ABCDEF.." + digest64, "nonce", codec.ErrMalformed},
		{"nonce short", testID.SN, testID.Username(), "M2M1.hs256.00.1764316800.0123456789abcde.." + digest64, "nonce", codec.ErrMalformed},
		{"bkd without flag", testID.SN, testID.Username(), "M2M1.hs256.00.1764316800.0123456789abcdef." + strings.Repeat("b", 32) + "." + digest64, "bkd", codec.ErrMalformed},
		{"flag without bkd", testID.SN, testID.Username(), "M2M1.hs256.01.1764316800.0123456789abcdef.." + digest64, "bkd", codec.ErrMalformed},
		{"digest md5 length for hs256", testID.SN, testID.Username(), "M2M1.hs256.00.1764316800.0123456789abcdef.." + strings.Repeat("a", 32), "digest", codec.ErrMalformed},
		{"digest upper", testID.SN, testID.Username(), "M2M1.hs256.00.1764316800.0123456789abcdef.." + strings.Repeat("A", 64), "digest", codec.ErrMalformed},
		{"extra field", testID.SN, testID.Username(), goodHS + ".x", "password", codec.ErrMalformed},
		{"missing field", testID.SN, testID.Username(), "M2M1.hs256.00.1764316800." + digest64, "password", codec.ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := codec.ParseLogin(tc.clientID, tc.username, []byte(tc.password))
			var cerr *codec.Error
			if !errors.As(err, &cerr) {
				t.Fatalf("got %v, want *codec.Error", err)
			}
			if cerr.Field != tc.field || !errors.Is(err, tc.sentinel) {
				t.Fatalf("got field %q (%v), want %q (%v)", cerr.Field, err, tc.field, tc.sentinel)
			}
		})
	}
}

func TestErrorsNeverEchoValues(t *testing.T) {
	secret := "s3cretPassw0rdXYZ"
	inputs := [][]byte{
		[]byte("M2M1.hs256.00." + secret + ".0123456789abcdef..x"),
		[]byte("M2M1.chg.md5.all.cipher." + secret + ".00000000000000aa.x"),
		[]byte("up=" + secret + ";upexp=1;down=a.b;downexp=1"),
	}
	for _, in := range inputs {
		errs := []error{}
		_, err := codec.ParseLogin(testID.SN, testID.Username(), in)
		errs = append(errs, err)
		_, err = codec.ParseControl(in)
		errs = append(errs, err)
		_, err = codec.ParseParams(in)
		errs = append(errs, err)
		for _, err := range errs {
			if err == nil {
				t.Fatalf("input parsed unexpectedly")
			}
			if strings.Contains(err.Error(), secret) {
				t.Fatalf("error echoes its input: %v", err)
			}
		}
	}
}

func TestLoginVerifyRejects(t *testing.T) {
	for _, alg := range []codec.Alg{codec.MD5, codec.HS256} {
		l := codec.Login{Identity: testID, Alg: alg, TS: 1764316800, Nonce: 7}
		pw, err := l.Sign(testUp)
		if err != nil {
			t.Fatal(err)
		}
		parsed, err := codec.ParseLogin(testID.SN, testID.Username(), pw)
		if err != nil {
			t.Fatal(err)
		}
		if !parsed.Verify(testUp) {
			t.Fatalf("%s: own login does not verify", alg)
		}
		if parsed.Verify(testDown) {
			t.Fatalf("%s: verifies with the wrong password", alg)
		}
		// The digest covers IMEI and IMSI: another binding must not verify.
		other := parsed
		other.IMSI = "460020084678121"
		if other.Verify(testUp) {
			t.Fatalf("%s: verifies with another IMSI", alg)
		}
		other = parsed
		other.TS++
		if other.Verify(testUp) {
			t.Fatalf("%s: verifies with another ts", alg)
		}
	}
}

func TestControlRoundTrip(t *testing.T) {
	wrapped, err := codec.WrapSessionKey(testBK, testID.SN, 9, make([]byte, 32), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	msgs := []codec.Control{
		{Kind: codec.KindSK, TS: 1, Exp: 2, SID: 9, Wrapped: wrapped},
		{Kind: codec.KindErr, TS: 0, Code: codec.CodeBKMismatch},
		{Kind: codec.KindCfg, TS: 5, RID: 1, Wrapped: wrapped},
		{Kind: codec.KindAcc, TS: 5, RID: 1, Mode: codec.ModeSMS},
		{Kind: codec.KindDone, TS: 4294967295, RID: 1},
		{Kind: codec.KindChg, What: codec.WhatBK, Mode: codec.ModeSMS, TS: 10, Nonce: 3},
		{Kind: codec.KindAck, RID: 1, TS: 10, Nonce: 4},
		{Kind: codec.KindAck, RID: 1, TS: 10, Nonce: 4, BKD: codec.BasicKeyDigest(codec.MD5, testBK, 1)},
	}
	for _, alg := range []codec.Alg{codec.MD5, codec.HS256} {
		for _, m := range msgs {
			m.Alg = alg
			pwd := testDown
			if m.Kind.Uplink() {
				pwd = testUp
			}
			payload, err := m.Sign(testID, pwd)
			if err != nil {
				t.Fatalf("%s %s: %v", alg, m.Kind, err)
			}
			got, err := codec.ParseControl(payload)
			if err != nil {
				t.Fatalf("%s %s: parse own payload: %v", alg, m.Kind, err)
			}
			if got != m {
				t.Fatalf("%s %s: round trip %+v != %+v", alg, m.Kind, got, m)
			}
			if !got.Verify(testID, pwd) {
				t.Fatalf("%s %s: does not verify", alg, m.Kind)
			}
			if got.Verify(testID, []byte("anotherPassword1")) {
				t.Fatalf("%s %s: verifies with another password", alg, m.Kind)
			}
			other := testID
			other.SN = "B1"
			if got.Verify(other, pwd) {
				t.Fatalf("%s %s: verifies for another terminal (topic not covered)", alg, m.Kind)
			}
		}
	}
}

func TestParseControlRefuses(t *testing.T) {
	d32 := strings.Repeat("0", 32)
	tests := []struct{ name, payload, field string }{
		{"unknown type", "M2M1.foo.md5.1.2.3." + d32, "type"},
		{"version", "M2M0.done.md5.1.0000000000000001." + d32, "version"},
		{"err code", "M2M1.err.md5.1.oops." + d32, "code"},
		{"acc not sms", "M2M1.acc.md5.1.0000000000000001.cipher." + d32, "mode"},
		{"chg what", "M2M1.chg.md5.key.sms.1.0000000000000001." + d32, "what"},
		{"chg mode", "M2M1.chg.md5.all.mail.1.0000000000000001." + d32, "mode"},
		{"done fields", "M2M1.done.md5.1.0000000000000001.x." + d32, "payload"},
		{"too few", "M2M1.done.md5", "payload"},
		{"sk wrapped padded", "M2M1.sk.md5.1.2.0000000000000001.AAAA==." + d32, "wrapped"},
		{"sk wrapped newline", "M2M1.sk.md5.1.2.0000000000000001.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\nA." + d32, "wrapped"},
		{"sk wrapped short", "M2M1.sk.md5.1.2.0000000000000001.AAAA." + d32, "wrapped"},
		{"ack bkd", "M2M1.ack.md5.0000000000000001.1.0000000000000002.abc." + d32, "bkd"},
		{"T leading zero", "M2M1.done.md5.01.0000000000000001." + d32, "T"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := codec.ParseControl([]byte(tc.payload))
			var cerr *codec.Error
			if !errors.As(err, &cerr) || cerr.Field != tc.field {
				t.Fatalf("got %v, want field %q", err, tc.field)
			}
		})
	}
	if _, err := codec.ParseControl(make([]byte, codec.MaxControlLen+1)); !errors.Is(err, codec.ErrTooLong) {
		t.Fatalf("oversize payload: got %v, want ErrTooLong", err)
	}
}

func TestParams(t *testing.T) {
	good := []codec.Params{
		{What: codec.WhatPwd, Up: []byte("abcdefgh"), UpExp: 1, Down: []byte("ABCDEFGH!~"), DownExp: codec.Never},
		{What: codec.WhatBK, BK: testBK, BKExp: 0},
		{What: codec.WhatAll, Up: []byte("abcdefgh"), Down: []byte("ABCDEFGH"), BK: testBK, BKExp: 5},
	}
	for _, p := range good {
		text, err := p.AppendTo(nil)
		if err != nil {
			t.Fatalf("%s: %v", p.What, err)
		}
		got, err := codec.ParseParams(text)
		if err != nil {
			t.Fatalf("%s: parse %q: %v", p.What, text, err)
		}
		again, _ := got.AppendTo(nil)
		if !bytes.Equal(again, text) || got.What != p.What {
			t.Fatalf("%s: round trip %q != %q", p.What, again, text)
		}
	}
	bad := []string{
		"",
		"up=abcdefgh;upexp=1;down=abcdefgh", // missing downexp
		"upexp=1;up=abcdefgh;down=abcdefgh;downexp=1",  // order
		"up=abc;upexp=1;down=abcdefgh;downexp=1",       // short password
		"up=abcdefgh;upexp=01;down=abcdefgh;downexp=1", // leading zero
		"bk=AAAA;bkexp=1", // short key
		"up=abcd efgh;upexp=1;down=abcdefgh;downexp=1",             // space
		"up=abcdefgh;upexp=1;down=abcdefgh;downexp=1;x=",           // extra
		"bk=0000000000000\r000000000000000000000000000000;bkexp=0", // base64 decoders skip \r: not canonical
	}
	for _, s := range bad {
		if _, err := codec.ParseParams([]byte(s)); !errors.Is(err, codec.ErrMalformed) {
			t.Errorf("%q: got %v, want ErrMalformed", s, err)
		}
	}
	if _, err := (&codec.Params{What: codec.WhatPwd, Up: []byte("a.bcdefgh"), Down: []byte("abcdefgh")}).AppendTo(nil); err == nil {
		t.Error("a password with '.' was encoded")
	}
}

func TestWrapRejectsTampering(t *testing.T) {
	ks := bytes.Repeat([]byte{7}, 32)
	w, err := codec.WrapSessionKey(testBK, testID.SN, 1, ks, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := codec.UnwrapSessionKey(testBK, testID.SN, 2, w); !errors.Is(err, codec.ErrDecrypt) {
		t.Fatalf("another sid: got %v", err)
	}
	if _, err := codec.UnwrapSessionKey(bytes.Repeat([]byte{1}, 32), testID.SN, 1, w); !errors.Is(err, codec.ErrDecrypt) {
		t.Fatalf("another key: got %v", err)
	}
	if _, err := codec.Wrap([]byte("short"), ks, nil, rand.Reader); !errors.Is(err, codec.ErrKey) {
		t.Fatalf("short key: got %v", err)
	}
}

func TestEnvelope(t *testing.T) {
	aead, err := codec.NewAEAD(bytes.Repeat([]byte{3}, 32))
	if err != nil {
		t.Fatal(err)
	}
	topic := codec.UpTopic(testID.SN, "t")
	env := codec.Seal(nil, aead, codec.Uplink, 5, topic, []byte("hello"))
	if len(env) != 5+codec.EnvelopeOverhead {
		t.Fatalf("envelope length %d", len(env))
	}
	if seq, pt, err := codec.Open(nil, aead, codec.Uplink, topic, env); err != nil || seq != 5 || string(pt) != "hello" {
		t.Fatalf("open: %d %q %v", seq, pt, err)
	}
	if _, _, err := codec.Open(nil, aead, codec.Downlink, topic, env); !errors.Is(err, codec.ErrDecrypt) {
		t.Fatalf("other direction: %v", err)
	}
	if _, _, err := codec.Open(nil, aead, codec.Uplink, topic+"x", env); !errors.Is(err, codec.ErrDecrypt) {
		t.Fatalf("other topic: %v", err)
	}
	for i := range env {
		bad := bytes.Clone(env)
		bad[i] ^= 0x80
		if _, _, err := codec.Open(nil, aead, codec.Uplink, topic, bad); err == nil {
			t.Fatalf("byte %d tampered: opened", i)
		}
	}
	if _, _, err := codec.Open(nil, aead, codec.Uplink, topic, env[:10]); !errors.Is(err, codec.ErrMalformed) {
		t.Fatalf("short: %v", err)
	}
}

func TestWindow(t *testing.T) {
	var w codec.Window
	steps := []struct {
		seq  uint64
		want codec.Verdict
	}{
		{1, codec.Fresh}, {1, codec.Repeated}, {3, codec.Fresh}, {2, codec.Fresh}, {2, codec.Repeated},
		{100, codec.Fresh}, {37, codec.Fresh}, {36, codec.TooOld}, {37, codec.Repeated}, {99, codec.Fresh},
		{1000, codec.Fresh}, {999, codec.Fresh}, {937, codec.Fresh}, {936, codec.TooOld}, {100, codec.TooOld},
	}
	for i, s := range steps {
		got := w.Check(s.seq)
		if got != s.want {
			t.Fatalf("step %d: Check(%d) = %d, want %d", i, s.seq, got, s.want)
		}
		if got == codec.Fresh {
			w.Accept(s.seq)
		}
	}
	if w.Top() != 1000 {
		t.Fatalf("top %d", w.Top())
	}
}

func TestParseTopic(t *testing.T) {
	tests := []struct {
		topic string
		kind  codec.TopicKind
		sn    string
	}{
		{"m2m/A1/up/temp", codec.TopicUp, "A1"},
		{"m2m/A1/up/", codec.TopicUp, "A1"},
		{"m2m/A1/down/a/b", codec.TopicDown, "A1"},
		{"$m2m/A1/key", codec.TopicKey, "A1"},
		{"$m2m/A1/ctl", codec.TopicCtl, "A1"},
		{"$m2m/A1/ctl/x", codec.TopicOther, ""},
		{"m2m/A1/up", codec.TopicOther, ""},
		{"m2m/+/up/x", codec.TopicOther, ""},
		{"m2m/A1/side/x", codec.TopicOther, ""},
		{"M2M/A1/up/x", codec.TopicOther, ""},
		{"", codec.TopicOther, ""},
	}
	for _, tc := range tests {
		kind, sn := codec.ParseTopic(tc.topic)
		if kind != tc.kind || sn != tc.sn {
			t.Errorf("%q: got %d %q, want %d %q", tc.topic, kind, sn, tc.kind, tc.sn)
		}
	}
}
