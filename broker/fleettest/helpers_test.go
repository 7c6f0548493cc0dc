package fleettest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/syncbuf"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
)

// adminToken is every test broker's admin token.
const adminToken = "fleet-test-admin-token-0123456789"

// member is one broker of a test fleet.
type member struct {
	name string
	b    *broker.Broker
	cfg  *broker.Config
	api  *adminapi.Client
	logs *syncbuf.Buffer
}

// testFleet is n brokers on one Vault.
type testFleet struct {
	t       testing.TB
	vault   *vaulttest.Server
	members []*member
}

// logOutput makes the brokers' logs visible with M2MGUARD_FLEET_LOG set.
func logOutput(buf *syncbuf.Buffer, name string) io.Writer {
	if os.Getenv("M2MGUARD_FLEET_LOG") == "" {
		return buf
	}
	return io.MultiWriter(buf, prefixed{name})
}

type prefixed struct{ name string }

func (p prefixed) Write(b []byte) (int, error) {
	fmt.Fprintf(os.Stderr, "[%s] %s", p.name, b)
	return len(b), nil
}

// startFleet starts n brokers on v; mod may change each broker's
// configuration.
func startFleet(t *testing.T, v *vaulttest.Server, n int, mod func(i int, cfg *broker.Config)) *testFleet {
	t.Helper()
	f := &testFleet{t: t, vault: v}
	cfgs := make([]*broker.Config, n)
	for i := range n {
		cfg := broker.Default()
		cfg.DataDir = filepath.Join(t.TempDir(), fmt.Sprintf("broker%d", i+1))
		cfg.MQTT.TCP, cfg.MQTT.WS, cfg.MQTT.TLS = "127.0.0.1:0", "", ""
		cfg.Admin.Listen, cfg.Admin.Token = "127.0.0.1:0", adminToken
		cfg.Store.Type = "vault"
		cfg.Store.Vault.Address, cfg.Store.Vault.Token = v.Addr, v.Token
		cfg.Store.Vault.Prefix = "fleet"
		if mod != nil {
			mod(i, cfg)
		}
		cfgs[i] = cfg
	}
	// The brokers start together: each embedded NATS node waits for a
	// majority of its peers before JetStream answers.
	f.members = make([]*member, n)
	errs := make([]error, n)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m := &member{name: fmt.Sprintf("broker%d", i+1), cfg: cfgs[i], logs: &syncbuf.Buffer{}}
			logger := slog.New(slog.NewTextHandler(logOutput(m.logs, m.name), &slog.HandlerOptions{Level: slog.LevelDebug}))
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			m.b, errs[i] = broker.Start(ctx, cfgs[i], logger)
			f.members[i] = m
		}()
	}
	wg.Wait()
	t.Logf("%d brokers started in %v", n, time.Since(start).Round(time.Millisecond))
	for i, m := range f.members {
		if m.b != nil {
			t.Cleanup(func() { m.b.Close() })
		}
		if errs[i] != nil {
			t.Fatalf("broker %d: %v", i+1, errs[i])
		}
		api, err := adminapi.New("http://"+m.b.Addr("admin"), adminToken, nil)
		if err != nil {
			t.Fatal(err)
		}
		m.api = api
	}
	return f
}

// restart stops broker i and starts it again on the same configuration
// (data directory, embedded NATS node and its files); its MQTT and admin
// addresses change.
func (f *testFleet) restart(t *testing.T, i int) {
	t.Helper()
	m := f.members[i]
	if err := m.b.Close(); err != nil {
		t.Fatalf("%s: close: %v", m.name, err)
	}
	logger := slog.New(slog.NewTextHandler(logOutput(m.logs, m.name), &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	b, err := broker.Start(ctx, m.cfg, logger)
	if err != nil {
		t.Fatalf("%s: restart: %v", m.name, err)
	}
	f.t.Cleanup(func() { b.Close() }) // the fleet's test, not a subtest's
	api, err := adminapi.New("http://"+b.Addr("admin"), adminToken, nil)
	if err != nil {
		t.Fatal(err)
	}
	m.b, m.api = b, api
}

// register provisions a terminal through broker i's admin API and returns
// its record.
func (f *testFleet) register(t *testing.T, i int, sn string) *keysvc.Terminal {
	t.Helper()
	ctx := context.Background()
	if _, err := f.members[i].api.Register(ctx, adminapi.RegisterRequest{SN: sn, IMEI: "354494040518570", IMSI: "460020084678120"}); err != nil {
		t.Fatal(err)
	}
	tm, err := f.members[i].b.Service().Get(ctx, sn)
	if err != nil {
		t.Fatal(err)
	}
	return tm
}

// connectBytes is a terminal's CONNECT (MQTT 3.1.1, clean session) with a
// fresh login token signed with up.
func connectBytes(t testing.TB, tm *keysvc.Terminal, up []byte) []byte {
	t.Helper()
	return connectWith(t, tm, up, true)
}

// connectWith is connectBytes with the clean session flag given.
func connectWith(t testing.TB, tm *keysvc.Terminal, up []byte, clean bool) []byte {
	t.Helper()
	var nonce [8]byte
	rand.Read(nonce[:])
	l := codec.Login{Identity: tm.Identity(), Alg: tm.Alg, TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(nonce[:]))}
	pw, err := l.Sign(up)
	if err != nil {
		t.Fatal(err)
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: clean, Keepalive: 600, ClientIdentifier: tm.SN,
			UsernameFlag: true, Username: []byte(tm.Identity().Username()), PasswordFlag: true, Password: pw}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// dial sends connect to addr and returns the connection and the CONNACK's
// return code (0 accepted; 0xff: closed without a CONNACK). The
// connection is closed at the test's end.
func dial(t testing.TB, addr string, connect []byte) (net.Conn, byte) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(connect); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.ReadFull(c, ack); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "reset") {
			return c, 0xff
		}
		t.Fatalf("connack: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	if ack[0] != 0x20 {
		t.Fatalf("not a CONNACK: % x", ack)
	}
	return c, ack[3]
}

// login logs terminal tm in on broker m with up and reports the CONNACK
// code; an accepted connection stays open until the test ends.
func login(t testing.TB, m *member, tm *keysvc.Terminal, up []byte) (net.Conn, byte) {
	t.Helper()
	return dial(t, m.b.Addr("tcp"), connectBytes(t, tm, up))
}

// closedWithin reports whether the broker closes c within d (a DISCONNECT
// or the end of the stream).
func closedWithin(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	defer c.SetReadDeadline(time.Time{})
	buf := make([]byte, 64)
	for {
		n, err := c.Read(buf)
		if err != nil {
			var ne net.Error
			return !(errors.As(err, &ne) && ne.Timeout())
		}
		if n > 0 && buf[0] == 0xe0 { // DISCONNECT (MQTT 5 only; 3.1.1 just closes)
			return true
		}
	}
}

// checkFor polls cond until it is true or fails t when timeout passes
// (testwait.For).
func checkFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, timeout, what, cond)
}

// holds reports which members hold a live session of clientID, by their
// hooks.
func (f *testFleet) holders(clientID string) []string {
	var out []string
	for _, m := range f.members {
		for _, s := range m.b.Hook().Sessions() {
			if s.ClientID == clientID {
				out = append(out, m.name)
			}
		}
	}
	return out
}

// metric sums the samples of a metric family on m's registry.
func metric(t testing.TB, m *member, name string) float64 {
	t.Helper()
	mfs, err := m.b.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, s := range mf.GetMetric() {
			switch {
			case s.GetCounter() != nil:
				sum += s.GetCounter().GetValue()
			case s.GetGauge() != nil:
				sum += s.GetGauge().GetValue()
			}
		}
	}
	return sum
}

// quietLogger discards unless M2MGUARD_FLEET_LOG is set.
func quietLogger() *slog.Logger {
	if os.Getenv("M2MGUARD_FLEET_LOG") == "" {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(prefixed{"nats"}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}
