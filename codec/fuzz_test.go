package codec_test

import (
	"bytes"
	"encoding/hex"
	"testing"

	"github.com/m2mguard/m2mguard/codec"
)

// Every parser has a fuzz target: none may panic, and whatever parses must
// re-encode to the same bytes. Seeds come from the SPEC vectors. Run one
// for longer with, e.g.:
//
//	go test ./codec -run '^$' -fuzz '^FuzzParseControl$' -fuzztime 60s

func seedVectors(f *testing.F) vectors {
	v, err := decodeVectors(readVectors(f))
	if err != nil {
		f.Fatal(err)
	}
	return v
}

func FuzzParseLogin(f *testing.F) {
	v := seedVectors(f)
	for _, s := range []valg{v.MD5, v.HS256} {
		for _, l := range []vlogin{s.LoginPlain, s.LoginSessionKey} {
			f.Add(l.ClientID, l.Username, []byte(l.Password))
		}
	}
	f.Fuzz(func(t *testing.T, clientID, username string, password []byte) {
		l, err := codec.ParseLogin(clientID, username, password)
		if err != nil {
			return
		}
		if l.ClientID() != clientID || l.Username() != username || !bytes.Equal(l.Password(), password) {
			t.Fatalf("re-encodes differently: %q %q %q", l.ClientID(), l.Username(), l.Password())
		}
		l.Verify([]byte("anyPassword1"))
	})
}

func FuzzParseControl(f *testing.F) {
	v := seedVectors(f)
	for _, s := range []valg{v.MD5, v.HS256} {
		for _, m := range []vmsg{s.SessionKey.vmsg, s.ChangeRequest, s.Cfg.vmsg, s.AccSMS, s.Ack, s.Done} {
			f.Add([]byte(m.Payload))
		}
	}
	f.Add([]byte("M2M1.err.md5.1764317001.busy.00000000000000000000000000000000"))
	f.Fuzz(func(t *testing.T, payload []byte) {
		c, err := codec.ParseControl(payload)
		if err != nil {
			return
		}
		if got := c.Encode(); !bytes.Equal(got, payload) {
			t.Fatalf("re-encodes to %q", got)
		}
		c.Verify(testID, testDown)
	})
}

func FuzzParseParams(f *testing.F) {
	v := seedVectors(f)
	f.Add([]byte(v.MD5.Cfg.Params))
	f.Add([]byte("up=abcdefgh;upexp=1;down=ABCDEFGH;downexp=4294967295"))
	f.Add([]byte("bk=ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1-f4CBgoM;bkexp=0"))
	f.Fuzz(func(t *testing.T, text []byte) {
		p, err := codec.ParseParams(text)
		if err != nil {
			return
		}
		got, err := p.AppendTo(nil)
		if err != nil || !bytes.Equal(got, text) {
			t.Fatalf("re-encodes to %q (%v)", got, err)
		}
	})
}

func FuzzParseSMS(f *testing.F) {
	v := seedVectors(f)
	f.Add([]byte(v.MD5.SMSText))
	f.Fuzz(func(t *testing.T, text []byte) {
		m, err := codec.ParseSMS(text)
		if err != nil {
			return
		}
		got, err := m.Encode()
		if err != nil || !bytes.Equal(got, text) {
			t.Fatalf("re-encodes to %q (%v)", got, err)
		}
	})
}

func FuzzOpen(f *testing.F) {
	v := seedVectors(f)
	ks, _ := hex.DecodeString(v.MD5.SessionKey.PlainSessionKey)
	aead, err := codec.NewAEAD(ks)
	if err != nil {
		f.Fatal(err)
	}
	for _, e := range []venvelope{v.MD5.UplinkEnvelope, v.MD5.DownlinkEnvelope} {
		p, _ := hex.DecodeString(e.PayloadHex)
		f.Add(e.Topic, p, e == v.MD5.UplinkEnvelope)
	}
	f.Fuzz(func(t *testing.T, topic string, envelope []byte, up bool) {
		dir := codec.Downlink
		if up {
			dir = codec.Uplink
		}
		seq, plain, err := codec.Open(nil, aead, dir, topic, envelope)
		if err != nil {
			return
		}
		if got := codec.Seal(nil, aead, dir, seq, topic, plain); !bytes.Equal(got, envelope) {
			t.Fatalf("re-seals to %x", got)
		}
	})
}

func FuzzUnwrap(f *testing.F) {
	v := seedVectors(f)
	bk, _ := hex.DecodeString(v.Terminal.BK)
	sk, err := codec.ParseControl([]byte(v.MD5.SessionKey.Payload))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(sk.Wrapped, uint64(sk.SID))
	f.Fuzz(func(t *testing.T, wrapped string, sid uint64) {
		ks, err := codec.UnwrapSessionKey(bk, v.Terminal.SN, codec.ID(sid), wrapped)
		if err == nil && len(ks) != codec.SessionKeySize {
			t.Fatalf("unwrapped %d bytes", len(ks))
		}
	})
}

func FuzzParseTopic(f *testing.F) {
	for _, s := range []string{"m2m/A1/up/t", "$m2m/A1/key", "$m2m/A1/ctl", "m2m/A1/down/x/y", "m2m/+/up/#"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, topic string) {
		kind, sn := codec.ParseTopic(topic)
		var rebuilt bool
		switch kind {
		case codec.TopicOther:
			return
		case codec.TopicKey:
			rebuilt = codec.KeyTopic(sn) == topic
		case codec.TopicCtl:
			rebuilt = codec.CtlTopic(sn) == topic
		case codec.TopicUp:
			rebuilt = len(topic) >= len(codec.UpTopic(sn, "")) && topic[:len(codec.UpTopic(sn, ""))] == codec.UpTopic(sn, "")
		case codec.TopicDown:
			rebuilt = len(topic) >= len(codec.DownTopic(sn, "")) && topic[:len(codec.DownTopic(sn, ""))] == codec.DownTopic(sn, "")
		}
		if !rebuilt || codec.ValidateSN(sn) != nil {
			t.Fatalf("%q classified as %d for sn %q", topic, kind, sn)
		}
	})
}
