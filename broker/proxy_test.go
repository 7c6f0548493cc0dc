package broker_test

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/packets"
	proxyproto "github.com/pires/go-proxyproto"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
)

// proxiedConfig is testConfig with mqtt.proxy_protocol_trusted set to
// trusted, through the environment layer as an operator would set it.
func proxiedConfig(t *testing.T, trusted string) *broker.Config {
	t.Helper()
	cfg := testConfig(t)
	env := map[string]string{"M2MGUARD_MQTT_PROXY_PROTOCOL_TRUSTED": trusted}
	if err := cfg.ApplyEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok }); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// proxyV2 returns the PROXY protocol v2 header of a TCP connection from
// client ("ip:port") to the broker address to.
func proxyV2(t testing.TB, client, to string) []byte {
	t.Helper()
	src, err := net.ResolveTCPAddr("tcp", client)
	if err != nil {
		t.Fatal(err)
	}
	dst, err := net.ResolveTCPAddr("tcp", to)
	if err != nil {
		t.Fatal(err)
	}
	h, err := proxyproto.HeaderProxyFromAddrs(2, src, dst).Format()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// dialFrom opens a TCP connection to addr from the loopback address from
// ("127.0.0.1" is the trusted proxy in these tests) and writes prefix (a
// PROXY header, or nothing).
func dialFrom(t testing.TB, from, addr string, prefix []byte) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 10 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if len(prefix) > 0 {
		if _, err := c.Write(prefix); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// terminalConnect is the MQTT 3.1.1 CONNECT of terminal tm with a fresh
// login token.
func terminalConnect(t testing.TB, tm *keysvc.Terminal) []byte {
	t.Helper()
	var nonce [8]byte
	rand.Read(nonce[:])
	l := codec.Login{Identity: tm.Identity(), Alg: tm.Alg, TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(nonce[:]))}
	pw, err := l.Sign(tm.Creds.Up)
	if err != nil {
		t.Fatal(err)
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 600, ClientIdentifier: tm.SN,
			UsernameFlag: true, Username: []byte(tm.Identity().Username()), PasswordFlag: true, Password: pw}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// appConnectCode sends an MQTT 5 CONNECT of application name with a wrong
// password over c and returns the CONNACK's reason code.
func appConnectCode(t *testing.T, c net.Conn, clientID, name string) byte {
	t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: clientID,
			UsernameFlag: true, Username: []byte(name), PasswordFlag: true, Password: []byte("not-the-password")}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil {
		t.Fatalf("%s: connack: %v", clientID, err)
	}
	if ack[0] != 0x20 {
		t.Fatalf("%s: got % x, want a CONNACK", clientID, ack)
	}
	return ack[3]
}

// connack reads a 3.1.1 CONNACK from c and returns its return code.
func connackCode(t *testing.T, c net.Conn) byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil {
		t.Fatalf("connack: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	if ack[0] != 0x20 {
		t.Fatalf("got % x, want a CONNACK", ack)
	}
	return ack[3]
}

// refusedAtOnce reports whether the broker closes c without answering.
func refusedAtOnce(c net.Conn) bool {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := c.Read(make([]byte, 1))
	return n == 0 && err != nil && !isTimeout(err)
}

// TestProxyProtocolClientAddress (README, "Load balancing"): behind a load balancer every
// connection came from the balancer's address, so one client's failed
// logins throttled every other client behind it, and the session list and
// logs named the balancer. With mqtt.proxy_protocol_trusted, a connection
// from a trusted proxy starts with a PROXY v2 header and the broker keys
// everything on the client address it names.
func TestProxyProtocolClientAddress(t *testing.T) {
	t.Parallel()
	cfg := proxiedConfig(t, "127.0.0.1/32")
	cfg.Auth.AppFailuresPerAddr = 1
	cfg.Auth.AppFailureRefill = time.Hour
	b, logs := start(t, cfg)
	addr := b.Addr("tcp")

	t.Run("session list and log show the client", func(t *testing.T) {
		tm, err := b.Service().Register(t.Context(), keysvc.RegisterRequest{SN: "PX1", IMEI: "354494040518570", IMSI: "460020084678120"})
		if err != nil {
			t.Fatal(err)
		}
		c := dialFrom(t, "127.0.0.1", addr, append(proxyV2(t, "127.0.0.2:40001", addr), terminalConnect(t, tm)...))
		if code := connackCode(t, c); code != 0 {
			t.Fatalf("login through the proxy: CONNACK code %d", code)
		}
		testwait.For(t, 10*time.Second, "the session of PX1", func() bool { return len(b.Hook().Sessions()) == 1 })
		if got := b.Hook().Sessions()[0].Remote; got != "127.0.0.2:40001" {
			t.Fatalf("session list: remote %q, want the client's 127.0.0.2:40001", got)
		}
		if !strings.Contains(logs.String(), "remote=127.0.0.2") {
			t.Fatal("the login_accepted event does not name the client's address")
		}
	})

	t.Run("throttle keys on the client", func(t *testing.T) {
		// One failed application login is allowed per address: the second
		// from 127.0.0.2 is refused as throttled (0x8A) ...
		for i, want := range []byte{0x86, 0x8A} {
			c := dialFrom(t, "127.0.0.1", addr, proxyV2(t, fmt.Sprintf("127.0.0.2:%d", 41000+i), addr))
			if got := appConnectCode(t, c, fmt.Sprintf("nobody-%d", i), "nobody"); got != want {
				t.Fatalf("attempt %d from 127.0.0.2 through the proxy: CONNACK 0x%02x, want 0x%02x", i+1, got, want)
			}
		}
		// ... but 127.0.0.3, behind the same proxy, still has its own budget.
		c := dialFrom(t, "127.0.0.1", addr, proxyV2(t, "127.0.0.3:42000", addr))
		if got := appConnectCode(t, c, "nobody-3", "nobody"); got != 0x86 {
			t.Fatalf("first attempt from 127.0.0.3 through the same proxy: CONNACK 0x%02x, want 0x86 (not throttled)", got)
		}
	})
}

// TestProxyProtocolPerAddrLimit: the per-address connection limit counts
// the client address a trusted proxy names, not the proxy's.
func TestProxyProtocolPerAddrLimit(t *testing.T) {
	t.Parallel()
	cfg := proxiedConfig(t, "127.0.0.1/32")
	cfg.MQTT.MaxConnsPerAddr = 2
	cfg.MQTT.ConnectTimeout = time.Minute // whatever closes below is a refusal
	b, _ := start(t, cfg)
	addr := b.Addr("tcp")
	for i := range 2 {
		dialFrom(t, "127.0.0.1", addr, proxyV2(t, fmt.Sprintf("127.0.0.2:%d", 43000+i), addr))
	}
	// Open, and counted against 127.0.0.2: the guard counts a proxied
	// connection against its client's address once it has read its
	// header, after the accept that connections_open counts.
	testwait.For(t, 10*time.Second, "two connections of 127.0.0.2 open", func() bool {
		return metricValue(t, b, "m2mguard_connections_open", "") == 2 &&
			metricValue(t, b, "m2mguard_connections_proxied_total", "") == 2
	})
	if c := dialFrom(t, "127.0.0.1", addr, proxyV2(t, "127.0.0.2:43002", addr)); !refusedAtOnce(c) {
		t.Fatal("a third connection of 127.0.0.2 through the proxy was kept (limit 2 per address)")
	}
	// Other clients of the same proxy are not affected: the proxy's own
	// address is not what the limit counts.
	for i := range 2 {
		c := dialFrom(t, "127.0.0.1", addr, proxyV2(t, fmt.Sprintf("127.0.0.3:%d", 44000+i), addr))
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); !isTimeout(err) {
			t.Fatalf("connection %d of 127.0.0.3 through the proxy was closed: %v", i+1, err)
		}
	}
	testwait.For(t, 10*time.Second, "one per-addr refusal", func() bool {
		return metricValue(t, b, "m2mguard_connections_refused_total", "per-addr") == 1
	})
}

// TestProxyProtocolUntrustedRefused: a PROXY header from an address that
// is not a trusted proxy is refused (the connection closed without an
// answer, counted, logged at debug); so is a connection from a trusted
// proxy without one. A plain client from an untrusted address is served.
func TestProxyProtocolUntrustedRefused(t *testing.T) {
	t.Parallel()
	cfg := proxiedConfig(t, "127.0.0.1/32")
	b, logs := start(t, cfg)
	addr := b.Addr("tcp")
	tm, err := b.Service().Register(t.Context(), keysvc.RegisterRequest{SN: "PX2", IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		t.Fatal(err)
	}
	// 127.0.0.2 claims to speak for 127.0.0.9 (v2, then v1).
	v1 := []byte("PROXY TCP4 127.0.0.9 127.0.0.1 45000 1883\r\n")
	for _, hdr := range [][]byte{proxyV2(t, "127.0.0.9:45000", addr), v1} {
		if c := dialFrom(t, "127.0.0.2", addr, append(hdr, terminalConnect(t, tm)...)); !refusedAtOnce(c) {
			t.Fatal("a PROXY header from an untrusted address was answered")
		}
	}
	// The trusted proxy without a header.
	if c := dialFrom(t, "127.0.0.1", addr, terminalConnect(t, tm)); !refusedAtOnce(c) {
		t.Fatal("a connection from the trusted proxy without a PROXY header was answered")
	}
	testwait.For(t, 10*time.Second, "the refusals counted", func() bool {
		return metricValue(t, b, "m2mguard_proxy_headers_refused_total", "untrusted") == 2 &&
			metricValue(t, b, "m2mguard_proxy_headers_refused_total", "invalid") == 1
	})
	if !strings.Contains(logs.String(), "reason=proxy-untrusted") {
		t.Error("the refusal of an untrusted PROXY header is not logged")
	}
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
			t.Errorf("a refused PROXY header logs above debug level: %s", line)
		}
	}
	if len(b.Hook().Sessions()) != 0 {
		t.Fatal("a refused connection logged in")
	}
	// The same terminal connecting directly from an untrusted address logs in.
	c := dialFrom(t, "127.0.0.2", addr, terminalConnect(t, tm))
	if code := connackCode(t, c); code != 0 {
		t.Fatalf("direct login from 127.0.0.2: CONNACK code %d", code)
	}
	testwait.For(t, 10*time.Second, "the direct session", func() bool { return len(b.Hook().Sessions()) == 1 })
	if got := b.Hook().Sessions()[0].Remote; !strings.HasPrefix(got, "127.0.0.2:") {
		t.Fatalf("direct session: remote %q", got)
	}
}

// TestProxyProtocolLocalCommand: a trusted proxy's LOCAL command (its
// health check) is accepted as the proxy's own connection: no refusal, no
// session, closed when the proxy closes it or at the CONNECT deadline.
func TestProxyProtocolLocalCommand(t *testing.T) {
	t.Parallel()
	cfg := proxiedConfig(t, "127.0.0.1/32")
	cfg.MQTT.ConnectTimeout = 300 * time.Millisecond
	b, _ := start(t, cfg)
	addr := b.Addr("tcp")
	local, err := (&proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}).Format()
	if err != nil {
		t.Fatal(err)
	}
	checks := 5
	for range checks {
		dialFrom(t, "127.0.0.1", addr, local).Close() // HAProxy's TCP check: connect, header, close
	}
	idle := dialFrom(t, "127.0.0.1", addr, local)
	if !refusedAtOnce(idle) {
		t.Fatal("an idle LOCAL connection outlived the CONNECT deadline")
	}
	testwait.For(t, 10*time.Second, "every health-check connection closed", func() bool {
		return metricValue(t, b, "m2mguard_connections_open", "") == 0
	})
	if n := metricValue(t, b, "m2mguard_proxy_headers_refused_total", "invalid"); n != 0 {
		t.Fatalf("%v LOCAL connections counted as refused", n)
	}
	if n := metricValue(t, b, "m2mguard_proxy_local_connections_total", ""); n != float64(checks+1) {
		t.Fatalf("m2mguard_proxy_local_connections_total %v, want %d", n, checks+1)
	}
}

// TestProxyProtocolWebSocket: the PROXY header precedes the HTTP upgrade
// of a WebSocket connection; the session shows the client's address.
func TestProxyProtocolWebSocket(t *testing.T) {
	t.Parallel()
	cfg := proxiedConfig(t, "127.0.0.1/32")
	cfg.MQTT.WS = "127.0.0.1:0"
	b, _ := start(t, cfg)
	pw := []byte("watch-password-0123")
	addApp(t, b, "watch", pw)
	ws := b.Addr("ws")
	d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 10 * time.Second,
		NetDial: func(network, a string) (net.Conn, error) {
			c, err := net.Dial(network, a)
			if err == nil {
				_, err = c.Write(proxyV2(t, "127.0.0.3:46000", a))
			}
			return c, err
		}}
	c, resp, err := d.Dial("ws://"+ws+"/mqtt", http.Header{})
	if err != nil {
		t.Fatalf("WebSocket through the proxy: %v", err)
	}
	resp.Body.Close()
	defer c.Close()
	appConnect(t, &wsStream{c: c}, "watch-1", "watch", pw, "m2m/+/up/#")
	sessions := b.Hook().Sessions()
	if len(sessions) != 1 || sessions[0].Remote != "127.0.0.3:46000" {
		t.Fatalf("sessions %+v, want watch-1 from 127.0.0.3:46000", sessions)
	}
}

// TestProxyProtocolTrustedConfig: the key takes networks and addresses in
// every layer; a bad entry is an error naming the key and the entry.
func TestProxyProtocolTrustedConfig(t *testing.T) {
	cfg, err := resolve(t, "mqtt:\n  proxy_protocol_trusted: \"10.0.0.0/8, 192.0.2.7\"\n", nil)
	if err != nil || fmt.Sprint(cfg.MQTT.ProxyProtocolTrusted) != "[10.0.0.0/8 192.0.2.7/32]" {
		t.Fatalf("YAML: %v, %v", cfg, err)
	}
	cfg, err = resolve(t, "", nil, "--mqtt-proxy-protocol-trusted", "2001:db8::/32")
	if err != nil || fmt.Sprint(cfg.MQTT.ProxyProtocolTrusted) != "[2001:db8::/32]" {
		t.Fatalf("flag: %v, %v", cfg, err)
	}
	if cfg, err := resolve(t, "", nil); err != nil || len(cfg.MQTT.ProxyProtocolTrusted) != 0 {
		t.Fatalf("default: %v, %v; want off", cfg, err)
	}
	_, err = resolve(t, "", map[string]string{"M2MGUARD_MQTT_PROXY_PROTOCOL_TRUSTED": "10.0.0.0/8,10.0.0.0/33"})
	var ce *broker.ConfigError
	if !errors.As(err, &ce) || ce.Key != "mqtt.proxy_protocol_trusted" || !strings.Contains(err.Error(), `"10.0.0.0/33"`) {
		t.Fatalf("bad network: %v", err)
	}
}

// TestProxyProtocolTLSPassthrough: a proxy that passes TLS through (no
// termination) puts the header before the TLS handshake; the broker's TLS
// listener reads it first and the session shows the client's address.
func TestProxyProtocolTLSPassthrough(t *testing.T) {
	t.Parallel()
	certFile, keyFile, pool := tlsFiles(t)
	cfg := proxiedConfig(t, "127.0.0.1/32")
	cfg.MQTT.TLS, cfg.MQTT.TLSCert, cfg.MQTT.TLSKey = "127.0.0.1:0", certFile, keyFile
	b, _ := start(t, cfg)
	pw := []byte("watch-password-0123")
	addApp(t, b, "watch", pw)
	raw := dialFrom(t, "127.0.0.1", b.Addr("tls"), proxyV2(t, "127.0.0.5:47000", b.Addr("tls")))
	c := tls.Client(raw, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})
	appConnect(t, c, "watch-1", "watch", pw, "m2m/+/up/#")
	if s := b.Hook().Sessions(); len(s) != 1 || s[0].Remote != "127.0.0.5:47000" {
		t.Fatalf("sessions %+v, want watch-1 from 127.0.0.5:47000", s)
	}
}
