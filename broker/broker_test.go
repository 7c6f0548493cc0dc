package broker_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/syncbuf"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
)

// testConfig is the default configuration on loopback ports chosen by the
// kernel, in a fresh data directory.
func testConfig(t *testing.T) *broker.Config {
	cfg := broker.Default()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.MQTT.TCP = "127.0.0.1:0"
	cfg.MQTT.WS = ""
	cfg.Admin.Listen = "127.0.0.1:0"
	return cfg
}

func start(t *testing.T, cfg *broker.Config) (*broker.Broker, *syncbuf.Buffer) {
	t.Helper()
	logs := &syncbuf.Buffer{}
	b, err := broker.Start(t.Context(), cfg, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b, logs
}

// addApp registers an application on b with the cheapest argon2id costs
// (1 pass, 1 MiB) instead of the production ones (2 passes, 19 MiB): a
// login is verified with the costs its stored hash names, and at the
// production costs each one takes about half a second of CPU under the
// race detector. The tests that use it are about listeners, routing and
// reach, not the hash (hook.TestAppLoginFloodBounded is).
func addApp(t *testing.T, b *broker.Broker, name string, password []byte) {
	t.Helper()
	svc, err := keysvc.New(keysvc.Options{Store: b.Service().Store(), AppHash: keysvc.AppHashParams{Time: 1, Memory: 1024}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.AddApp(t.Context(), keysvc.AddAppRequest{Name: name, Password: password}); err != nil {
		t.Fatal(err)
	}
}

// login opens a raw MQTT 3.1.1 connection as terminal tm and returns it
// once the broker accepted the login.
func login(t testing.TB, addr string, tm *keysvc.Terminal) net.Conn {
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
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, ack); err != nil {
		t.Fatalf("connack: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	if ack[0] != 0x20 || ack[3] != 0 {
		t.Fatalf("login refused: connack % x", ack)
	}
	return c
}

func TestStartFirstRunCreatesDataDir(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	b, logs := start(t, cfg)

	for _, f := range []string{"master.key", "admin.token", "m2mguard.db"} {
		fi, err := os.Stat(filepath.Join(cfg.DataDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if f != "m2mguard.db" && fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	if fi, _ := os.Stat(cfg.DataDir); fi.Mode().Perm() != 0o700 {
		t.Errorf("data dir mode %v, want 0700", fi.Mode().Perm())
	}
	tok, _ := os.ReadFile(filepath.Join(cfg.DataDir, "admin.token"))
	if strings.Contains(logs.String(), strings.TrimSpace(string(tok))) {
		t.Error("the admin token appears in the log")
	}
	if !strings.Contains(logs.String(), filepath.Join(cfg.DataDir, "admin.token")) {
		t.Error("the log does not name the token file")
	}
	if !strings.HasPrefix(b.PublicURL(), "tcp://127.0.0.1:") {
		t.Errorf("public url %q", b.PublicURL())
	}

	// A terminal registered in the service logs in over the TCP listener.
	tm, err := b.Service().Register(t.Context(), keysvc.RegisterRequest{SN: "A1", IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		t.Fatal(err)
	}
	c := login(t, b.Addr("tcp"), tm)
	defer c.Close()
	if err := b.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if strings.Contains(logs.String(), string(tm.Creds.Up)) {
		t.Error("a password appears in the log")
	}

	// Second run: same key, same token, the terminal is still there.
	cfg2 := *cfg
	b2, _ := start(t, &cfg2)
	if _, err := b2.Service().Get(t.Context(), "A1"); err != nil {
		t.Fatalf("after restart: %v", err)
	}
	tok2, _ := os.ReadFile(filepath.Join(cfg.DataDir, "admin.token"))
	if !bytes.Equal(tok, tok2) {
		t.Error("the admin token changed on restart")
	}
}

func TestStartErrorsNameTheKey(t *testing.T) {
	t.Parallel()
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	for _, tc := range []struct {
		name string
		tune func(c *broker.Config)
		key  string
	}{
		{"tcp port taken", func(c *broker.Config) { c.MQTT.TCP = taken.Addr().String() }, "mqtt.tcp"},
		{"admin port taken", func(c *broker.Config) { c.Admin.Listen = taken.Addr().String() }, "admin.listen"},
		{"ws port taken", func(c *broker.Config) { c.MQTT.WS = taken.Addr().String() }, "mqtt.ws"},
		{"missing certificate", func(c *broker.Config) { c.MQTT.TLSCert, c.MQTT.TLSKey = "/nonexistent.pem", "/nonexistent.key" }, "mqtt.tls_cert"},
		{"unreadable token file", func(c *broker.Config) { c.Admin.TokenFile = t.TempDir() }, "admin.token_file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t)
			tc.tune(cfg)
			_, err := broker.Start(t.Context(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
			ce, ok := err.(*broker.ConfigError)
			if !ok || ce.Key != tc.key {
				t.Fatalf("err = %v, want a ConfigError on %s", err, tc.key)
			}
		})
	}
}

func TestRunStopsOnCancel(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	logs := &syncbuf.Buffer{}
	go func() { done <- broker.Run(ctx, cfg, slog.New(slog.NewTextHandler(logs, nil))) }()
	testwait.For(t, 10*time.Second, "the broker started", func() bool {
		select {
		case err := <-done:
			t.Fatalf("Run returned before it was cancelled: %v", err)
		default:
		}
		return strings.Contains(logs.String(), "broker started")
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if !strings.Contains(logs.String(), "stopped") {
		t.Error("no stop in the log")
	}
}

// TestIdleClientMemory measures what one idle, authenticated terminal
// connection costs the broker, with mochi's defaults and with the tuned
// settings. Run it by hand (it opens 2 x N connections):
//
//	M2MGUARD_MEASURE=1 go test ./broker -run TestIdleClientMemory -v
func TestIdleClientMemory(t *testing.T) {
	if os.Getenv("M2MGUARD_MEASURE") == "" {
		t.Skip("set M2MGUARD_MEASURE=1 to measure")
	}
	n := 1000
	if s := os.Getenv("M2MGUARD_MEASURE_N"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n < 1 {
			t.Fatalf("M2MGUARD_MEASURE_N=%q: want a positive number", s)
		}
	}
	for _, tc := range []struct {
		name                     string
		read, write, writesQueue int
	}{
		{"mochi defaults", 2048, 2048, 8192},
		{"m2mguard defaults", broker.DefaultReadBuffer, broker.DefaultWriteBuffer, broker.DefaultMaxWritesPending},
	} {
		per := measureIdle(t, n, tc.read, tc.write, tc.writesQueue)
		t.Logf("%-18s read %5d write %5d max_writes_pending %5d: %6.1f KiB per idle terminal (heap in use + goroutine stacks; the test side holds only a net.Conn)",
			tc.name, tc.read, tc.write, tc.writesQueue, per)
	}
}

// TestIdleMeasurementBeyondPerAddrLimit: the measurement above opens all
// its connections from one address, more than mqtt.max_conns_per_addr
// allows by default; it must raise that limit for its broker instead of
// failing at connection 257. (A short run of it, in CI.)
func TestIdleMeasurementBeyondPerAddrLimit(t *testing.T) {
	n := broker.Default().MQTT.MaxConnsPerAddr + 20
	if per := measureIdle(t, n, broker.DefaultReadBuffer, broker.DefaultWriteBuffer, broker.DefaultMaxWritesPending); per <= 0 {
		t.Fatalf("%d idle terminals measured %.1f KiB each", n, per)
	}
}

// measureIdle starts a broker with the given buffers, logs n terminals in
// from one address and returns the broker's memory per idle terminal, in
// KiB (heap in use plus goroutine stacks, after GC).
func measureIdle(t *testing.T, n, read, write, writesQueue int) float64 {
	t.Helper()
	cfg := testConfig(t)
	cfg.Admin.Listen = ""
	cfg.MQTT.ReadBuffer, cfg.MQTT.WriteBuffer, cfg.MQTT.MaxWritesPending = read, write, writesQueue
	// Every connection comes from 127.0.0.1: the per-address guard would
	// close those past its limit.
	cfg.MQTT.MaxConnsPerAddr = max(cfg.MQTT.MaxConnsPerAddr, n+1)
	b, err := broker.Start(t.Context(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var csv strings.Builder
	csv.WriteString("sn,imei,imsi,msisdn,alg\n")
	for i := range n {
		fmt.Fprintf(&csv, "M%d,35449404%07d,46002%07d,,hs256\n", i, i, i)
	}
	if _, err := b.Service().Import(t.Context(), strings.NewReader(csv.String()), keysvc.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	terms := make([]*keysvc.Terminal, n)
	for i := range n {
		if terms[i], err = b.Service().Get(t.Context(), fmt.Sprintf("M%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	// Warm up the code paths and pools with one connection.
	login(t, b.Addr("tcp"), terms[0]).Close()
	before := memUse()
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for _, tm := range terms {
		conns = append(conns, login(t, b.Addr("tcp"), tm))
	}
	after := memUse()
	return (float64(after) - float64(before)) / float64(n) / 1024
}

// memUse is the heap in use plus goroutine stacks after a GC.
func memUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}

// TestSessionExpiryReachesMochi: disconnected sessions are not kept forever
// (mochi's default); mqtt.session_expiry bounds them, and the messages
// queued for them live as long (mochi's 24 hours at least).
func TestSessionExpiryReachesMochi(t *testing.T) {
	for _, c := range []struct {
		expiry          time.Duration
		session, queued int64
	}{
		{0, 7 * 24 * 3600, 7 * 24 * 3600}, // the default
		{time.Hour, 3600, 24 * 3600},
		{30 * 24 * time.Hour, 30 * 24 * 3600, 30 * 24 * 3600},
	} {
		cfg := broker.Default()
		if c.expiry != 0 {
			cfg.MQTT.SessionExpiry = c.expiry
		}
		caps := broker.MochiOptions(cfg, slog.New(slog.DiscardHandler)).Capabilities
		if int64(caps.MaximumSessionExpiryInterval) != c.session || caps.MaximumMessageExpiryInterval != c.queued {
			t.Errorf("session_expiry %v: sessions kept %d s, messages %d s; want %d s, %d s", cfg.MQTT.SessionExpiry,
				caps.MaximumSessionExpiryInterval, caps.MaximumMessageExpiryInterval, c.session, c.queued)
		}
	}
}

// TestAppBudgetsReachTheHook: the auth.app_* keys configure the hook. With
// one failed application login allowed per address, the second attempt
// from that address is refused as throttled (MQTT 5: 0x8A) before any
// verification; the in-flight gauge is served.
func TestAppBudgetsReachTheHook(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	cfg.Auth.AppFailuresPerAddr = 1
	cfg.Auth.AppFailureRefill = time.Hour
	b, _ := start(t, cfg)
	for i, want := range []byte{0x86, 0x8A} {
		if got := connectApp(t, b.Addr("tcp"), fmt.Sprintf("nobody-%d", i), []byte("not-the-password")); got != want {
			t.Fatalf("attempt %d: CONNACK 0x%02x, want 0x%02x", i+1, got, want)
		}
	}
	mfs, err := b.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mf := range mfs {
		found = found || mf.GetName() == "m2mguard_app_verifications_in_flight"
	}
	if !found {
		t.Error("m2mguard_app_verifications_in_flight is not served")
	}
}

// connectApp sends an MQTT 5 CONNECT as application name and returns the
// CONNACK reason code.
func connectApp(t *testing.T, addr, name string, password []byte) byte {
	t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: name + "-1",
			UsernameFlag: true, Username: []byte(name), PasswordFlag: true, Password: password}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4) // type, length, flags, reason code
	if _, err := io.ReadFull(c, ack); err != nil {
		t.Fatalf("connack: %v", err)
	}
	if ack[0] != 0x20 {
		t.Fatalf("got % x, want a CONNACK", ack)
	}
	return ack[3]
}
