package fleet

import (
	"regexp"
	"strings"
	"testing"
)

// kvKeyRE is JetStream KV's key charset (nats.go validKeyRe), without
// leading or trailing dots.
var kvKeyRE = regexp.MustCompile(`^[-/_=\.a-zA-Z0-9]+$`)

// FuzzEscapeKey: every string EscapeKey accepts becomes a valid KV key of
// one subject token that UnescapeKey turns back into the same string; a key
// UnescapeKey accepts escapes back to itself (one key per string).
func FuzzEscapeKey(f *testing.F) {
	for _, s := range []string{"A00MS8011390002S", "dash-1", "a.b", "*", ">", "_", "_41", "α/β", " ", "\x00", "x_2E", "-", strings.Repeat("z", MaxKeyInput)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		k, err := EscapeKey(s)
		if err == nil {
			if !kvKeyRE.MatchString(k) || strings.Contains(k, ".") {
				t.Fatalf("EscapeKey(%q) = %q: not one valid KV key token", s, k)
			}
			back, err := UnescapeKey(k)
			if err != nil || back != s {
				t.Fatalf("UnescapeKey(EscapeKey(%q)) = %q, %v", s, back, err)
			}
		} else if s != "" && len(s) <= MaxKeyInput {
			t.Fatalf("EscapeKey(%q) refused: %v", s, err)
		}
		if u, err := UnescapeKey(s); err == nil {
			if again, err := EscapeKey(u); err != nil || again != s {
				t.Fatalf("EscapeKey(UnescapeKey(%q)) = %q, %v: two keys for one string", s, again, err)
			}
		}
	})
}

// FuzzReplayKey: a replay key is a valid KV key whose last token is the
// nonce.
func FuzzReplayKey(f *testing.F) {
	f.Add("A00MS8011390002S", uint64(1))
	f.Add("a.b*", uint64(1<<63))
	f.Fuzz(func(t *testing.T, sn string, nonce uint64) {
		k, err := ReplayKey(sn, nonce)
		if err != nil {
			return
		}
		if !kvKeyRE.MatchString(k) || strings.Count(k, ".") != 1 || len(k[strings.IndexByte(k, '.')+1:]) != 16 {
			t.Fatalf("ReplayKey(%q, %d) = %q", sn, nonce, k)
		}
	})
}

// FuzzDecodeEntry: a directory value from NATS never panics the decoder,
// and what it accepts has a broker and a known kind.
func FuzzDecodeEntry(f *testing.F) {
	f.Add("A00MS8011390002S", []byte(`{"broker":"a","kind":"terminal","sn":"A00MS8011390002S","remote":"1.2.3.4:5","protocol":5,"since":"2026-01-01T00:00:00Z"}`))
	f.Add("dash_2D1", []byte(`{"broker":"b","kind":"app","app":"dash"}`))
	f.Add("x", []byte(`{"broker":"","kind":"x"}`))
	f.Add("x", []byte(`[]`))
	f.Fuzz(func(t *testing.T, key string, data []byte) {
		e, err := decodeEntry(key, data)
		if err != nil {
			return
		}
		if e.Broker == "" || e.Kind != KindTerminal && e.Kind != KindApp || e.ClientID == "" {
			t.Fatalf("accepted %+v", e)
		}
	})
}

// FuzzDecodeEvent: an event from the stream never panics the decoder; what
// it accepts has a valid kind and origin and is never a resync.
func FuzzDecodeEvent(f *testing.F) {
	f.Add([]byte(`{"kind":"revoke","origin":"a","time":"2026-01-01T00:00:00Z","sn":"A00MS8011390002S","reason":"disabled"}`))
	f.Add([]byte(`{"kind":"resync","origin":"a"}`))
	f.Add([]byte(`{"kind":"x.y","origin":"a"}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := decodeEvent(data)
		if err != nil {
			return
		}
		if !kindRE.MatchString(e.Kind) || e.Kind == EventResync || !brokerIDRE.MatchString(e.Origin) {
			t.Fatalf("accepted %+v", e)
		}
	})
}

// FuzzDecodeThrottleBatch: a throttle message never panics the decoder and
// what it accepts is bounded.
func FuzzDecodeThrottleBatch(f *testing.F) {
	f.Add([]byte(`{"origin":"a","ops":[{"id":"A00MS8011390002S","addr":"1.2.3.4","fail":true},{"id":"dash","addr":"::1"}]}`))
	f.Add([]byte(`{"origin":"","ops":[]}`))
	f.Add([]byte(`{"origin":"a","ops":[{"id":""}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := decodeThrottleBatch(data)
		if err != nil {
			return
		}
		if b.Origin == "" || len(b.Ops) > throttleBatchMax {
			t.Fatalf("accepted %+v", b)
		}
		for _, op := range b.Ops {
			if op.ID == "" || len(op.ID) > maxIDLen || len(op.Addr) > maxIDLen {
				t.Fatalf("accepted op %+v", op)
			}
		}
	})
}
