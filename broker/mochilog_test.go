package broker_test

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
)

// TestRefusedLoginAndShutdownLogNoWarnNoise: a refused login is logged
// once, by the hook's login_refused event, not a second time by mochi as a
// WARN with an empty message; neither a connection that closes before its
// CONNECT nor a clean shutdown with clients connected logs a WARN. (Live
// broker, raw MQTT connections.)
func TestRefusedLoginAndShutdownLogNoWarnNoise(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	b, logs := start(t, cfg)
	ctx := t.Context()
	var terms []*keysvc.Terminal
	for _, sn := range []string{"LOG1", "LOG2", "LOG3"} {
		tm, err := b.Service().Register(ctx, keysvc.RegisterRequest{SN: sn, IMEI: "354494040518570", IMSI: "460020084678120"})
		if err != nil {
			t.Fatal(err)
		}
		terms = append(terms, tm)
	}
	for _, tm := range terms[:2] {
		defer login(t, b.Addr("tcp"), tm).Close()
	}

	// A login with a wrong password token.
	bad := terms[2]
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: bad.SN,
			UsernameFlag: true, Username: []byte(bad.Identity().Username()), PasswordFlag: true, Password: []byte("x")}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", b.Addr("tcp"))
	if err != nil {
		t.Fatal(err)
	}
	c.Write(buf.Bytes())
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil || ack[3] == 0 {
		t.Fatalf("bad login: connack % x, %v", ack, err)
	}
	c.Close()
	// A connection that closes before sending CONNECT (a port probe).
	probe, err := net.Dial("tcp", b.Addr("tcp"))
	if err != nil {
		t.Fatal(err)
	}
	probe.Close()

	testwait.For(t, 10*time.Second, "mochi's report of both connections", func() bool {
		s := logs.String()
		return strings.Contains(s, "bad username or password") && strings.Contains(s, "read connection: EOF")
	})
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	var warns []string
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "level=WARN") && !strings.Contains(line, "login_refused") {
			warns = append(warns, line)
		}
	}
	if len(warns) > 0 {
		t.Fatalf("%d WARN lines besides the hook's login_refused event:\n%s", len(warns), strings.Join(warns, "\n"))
	}
	if n := strings.Count(logs.String(), "event=login_refused"); n != 1 {
		t.Fatalf("login_refused logged %d times, want once", n)
	}
}

// TestMochiLogKeepsRealWarnings: what mochi reports besides connection
// ends (a full client store, an error nobody expects) stays a WARN, and an
// unexplained connection error gets a message.
func TestMochiLogKeepsRealWarnings(t *testing.T) {
	var out bytes.Buffer
	log := slog.New(broker.MochiOptions(broker.Default(), slog.New(slog.NewTextHandler(&out, nil))).Logger.Handler())
	log.Warn("client store quota reached", "client", "c1", "listener", "tcp")
	log.Warn("", "error", errors.New("tls: first record does not look like a TLS handshake"))
	log.Warn("", "error", packets.ErrProtocolViolationNoPacketID)
	got := out.String()
	if strings.Count(got, "level=WARN") != 3 || !strings.Contains(got, "client store quota reached") || strings.Contains(got, `msg=""`) {
		t.Fatalf("real warnings lost or left without a message:\n%s", got)
	}
}

// TestListenersLoggedOnce: a started broker logs each listener once, at
// info level ("mqtt listener" with its bound address); mochi's own
// "attached listener" is a debug line.
func TestListenersLoggedOnce(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	cfg.MQTT.WS = "127.0.0.1:0"
	_, logs := start(t, cfg)
	for _, id := range []string{"tcp", "ws"} {
		var info int
		for _, line := range strings.Split(logs.String(), "\n") {
			if strings.Contains(line, "level=INFO") && strings.Contains(line, "listener") && strings.Contains(line, "id="+id+" ") {
				info++
			}
		}
		if info != 1 {
			t.Errorf("listener %s logged %d times at info level, want once:\n%s", id, info, logs.String())
		}
	}
}
