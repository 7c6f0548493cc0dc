package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
)

// startLocalBroker starts an in-process broker on a fresh embedded store in
// dir, holding terms and (in hook mode) the benchmark application; tune
// may change the configuration before the start.
func startLocalBroker(ctx context.Context, dir, mode string, terms []*Terminal, appPassword string, tune ...func(*BrokerConfig)) (*Broker, error) {
	key := make([]byte, 32)
	rand.Read(key)
	cfg := BrokerConfig{Mode: mode, Store: "bolt", BoltPath: filepath.Join(dir, "s.db"), MasterKey: key,
		CacheTTL: time.Hour, Prewarm: true, WritesPending: 256, NetBuf: 2048}
	for _, f := range tune {
		f(&cfg)
	}
	if mode == "hook" {
		var csv bytes.Buffer
		if err := writeTerminals(&csv, terms); err != nil {
			return nil, err
		}
		st, err := openStore(ctx, cfg)
		if err != nil {
			return nil, err
		}
		err = provisionApp(ctx, st, csv.Bytes(), appName, appPassword, false)
		st.Close()
		if err != nil {
			return nil, err
		}
	}
	return StartBroker(ctx, cfg)
}

// discardConn is a net.Conn (from a net.Pipe) whose writes vanish: what
// the hook writes to a terminal (its sk message) is encoded by mochi but
// sent nowhere. Its remote address is a TCP one, as a broker's listener
// gives them (a pipe's "pipe" has no port: the hook would spend an error
// value on it that no real connection costs).
type discardConn struct{ net.Conn }

func (discardConn) Write(p []byte) (int, error) { return len(p), nil }

func (discardConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 40000}
}

// loginKind is the CONNECT a login benchmark sends.
type loginKind int

const (
	loginAccepted  loginKind = iota // a genuine login asking for a session key
	loginBadDigest                  // the same with one digit of its digest changed, from a fresh address
	loginUnknownSN                  // a genuine-looking login of a serial number the store does not hold, from a fresh address
	loginThrottled                  // a bad digest from an address the throttle refuses already
)

// benchLogins calls connect once per iteration of b with mochi's own client
// type for t (on a discardConn: the hook, not sockets, is measured) and a
// CONNECT of the given kind, each with a fresh nonce. The tokens and
// addresses are made in batches outside the timed region.
func benchLogins(b *testing.B, br *Broker, t *Terminal, kind loginKind, connect func(*mqtt.Client, packets.Packet)) {
	conn, peer := net.Pipe()
	defer peer.Close()
	defer conn.Close()
	if kind == loginUnknownSN {
		unknown := *t
		unknown.ID.SN = "UNKNOWN" + t.ID.SN[len("UNKNOWN"):]
		t = &unknown
	}
	cl := br.Server.NewClient(discardConn{conn}, "bench", t.ID.SN, false)
	cl.Properties.ProtocolVersion = 4
	user := []byte(t.ID.Username())
	if kind == loginThrottled {
		// Fail from this address until the throttle refuses it.
		for range 8 {
			pw, err := loginPassword(t, true)
			if err != nil {
				b.Fatal(err)
			}
			_ = br.Hook.OnConnect(cl, packets.Packet{Connect: packets.ConnectParams{ClientIdentifier: t.ID.SN,
				UsernameFlag: true, Username: user, PasswordFlag: true, Password: badDigest(pw)}})
		}
	}
	var tokens [][]byte
	var remotes []string
	addrs := 0
	b.ReportAllocs()
	for b.Loop() {
		if len(tokens) == 0 {
			b.StopTimer()
			for range 1024 {
				pw, err := loginPassword(t, true)
				if err != nil {
					b.Fatal(err)
				}
				tok := []byte(pw)
				if kind == loginBadDigest || kind == loginThrottled {
					tok = badDigest(pw)
				}
				tokens = append(tokens, tok)
				if kind == loginBadDigest || kind == loginUnknownSN {
					// A fresh (sn, address) pair each time: the throttle
					// never gets to refuse one.
					addrs++
					remotes = append(remotes, fmt.Sprintf("10.%d.%d.%d:40000", addrs>>16&0xff, addrs>>8&0xff, addrs&0xff))
				}
			}
			b.StartTimer()
		}
		if len(remotes) > 0 {
			cl.Net.Remote, remotes = remotes[0], remotes[1:]
		}
		connect(cl, packets.Packet{Connect: packets.ConnectParams{ClientIdentifier: t.ID.SN,
			UsernameFlag: true, Username: user, PasswordFlag: true, Password: tokens[0]}})
		tokens = tokens[1:]
	}
}

// badDigest returns the token pw with the last digit of its digest
// changed.
func badDigest(pw string) []byte {
	tok := []byte(pw)
	if tok[len(tok)-1] == '0' {
		tok[len(tok)-1] = '1'
	} else {
		tok[len(tok)-1] = '0'
	}
	return tok
}

// benchHookLogin measures everything the hook does for one accepted CONNECT
// of a terminal asking for a session key: hook.OnConnect (parse, cached
// lookup, binding, skew, replay and throttle checks, digest, session key
// and its signed sk message, metrics, the login_accepted event) and
// OnDisconnect.
func benchHookLogin(b *testing.B, br *Broker, t *Terminal) {
	benchLogins(b, br, t, loginAccepted, func(cl *mqtt.Client, pk packets.Packet) {
		if err := br.Hook.OnConnect(cl, pk); err != nil {
			b.Fatalf("login refused: %v", err)
		}
		br.Hook.OnDisconnect(cl, nil, true)
	})
}

// benchHookRefusal measures everything the hook does for one refused
// CONNECT of the given kind: hook.OnConnect up to the refusal, its
// metrics and login_refused event, the throttle's count, and the CONNACK
// it has mochi write (to the discardConn).
func benchHookRefusal(b *testing.B, br *Broker, t *Terminal, kind loginKind) {
	benchLogins(b, br, t, kind, func(cl *mqtt.Client, pk packets.Packet) {
		if err := br.Hook.OnConnect(cl, pk); err == nil {
			b.Fatal("login accepted")
		}
	})
}

// benchHookConnection measures every hook call of one terminal's
// connection as the connect storm makes them: OnConnect (the login, as in
// benchHookLogin), OnSessionEstablished, the ACL check of its two SUBSCRIBE
// filters, OnSubscribed on the key topic (which encodes the sk message,
// through OnPacketEncode, for mochi's writer), OnPacketEncode of the
// CONNACK and two SUBACKs, and OnDisconnect. It is the hook's whole share
// of a storm connection.
func benchHookConnection(b *testing.B, br *Broker, t *Terminal) {
	h := br.Hook
	keyTopic, downFilter := codec.KeyTopic(t.ID.SN), codec.DownTopic(t.ID.SN, "#")
	sub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe},
		Filters: packets.Subscriptions{{Filter: keyTopic}, {Filter: downFilter}}}
	connack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}}
	suback := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Suback}}
	benchLogins(b, br, t, loginAccepted, func(cl *mqtt.Client, pk packets.Packet) {
		if err := h.OnConnect(cl, pk); err != nil || !h.OnConnectAuthenticate(cl, pk) {
			b.Fatalf("login refused: %v", err)
		}
		h.OnPacketEncode(cl, connack)
		h.OnSessionEstablished(cl, pk)
		if !h.OnACLCheck(cl, keyTopic, false) || !h.OnACLCheck(cl, downFilter, false) {
			b.Fatal("subscriptions refused")
		}
		h.OnSubscribed(cl, sub, []byte{0, 0})
		h.OnPacketEncode(cl, suback)
		h.OnPacketEncode(cl, suback)
		h.OnDisconnect(cl, nil, true)
	})
}

// hookLoginCost runs bench (benchHookLogin or benchHookConnection) with
// testing.Benchmark on an in-process broker in a temporary directory.
func hookLoginCost(ctx context.Context, dir string, bench func(*testing.B, *Broker, *Terminal)) (VerifyCost, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return VerifyCost{}, err
	}
	terms := genTerminals(1)
	br, err := startLocalBroker(ctx, dir, "hook", terms, "bench-app-password")
	if err != nil {
		return VerifyCost{}, fmt.Errorf("login cost broker: %w", err)
	}
	defer br.Close()
	var failed bool
	r := testing.Benchmark(func(b *testing.B) {
		bench(b, br, terms[0])
		failed = b.Failed()
	})
	if failed || r.N == 0 {
		return VerifyCost{}, fmt.Errorf("login cost benchmark failed")
	}
	return VerifyCost{NsPerOp: r.NsPerOp(), AllocsPerOp: r.AllocsPerOp(), BytesPerOp: r.AllocedBytesPerOp()}, nil
}
