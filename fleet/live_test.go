package fleet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/mochifix"
	"github.com/m2mguard/m2mguard/replay"
)

// liveBroker is a mochi broker with the m2mguard hook on one shared key
// service, as brokers of a fleet on one Vault are.
type liveBroker struct{ url string }

// startLiveBroker starts a broker whose hook uses rg and th.
func startLiveBroker(t testing.TB, svc *keysvc.Service, rg hook.ReplayGuard, th hook.Throttler) liveBroker {
	t.Helper()
	server := mqtt.New(&mqtt.Options{InlineClient: true, Logger: testLogger()})
	h, err := hook.New(hook.Options{Registry: svc, Server: server, Logger: testLogger(), ReplayGuard: rg, Throttler: th})
	if err != nil {
		t.Fatal(err)
	}
	if err := server.AddHook(h, nil); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := server.AddListener(listeners.NewNet("tcp", ln)); err != nil {
		t.Fatal(err)
	}
	if err := server.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mochifix.Close(server, []string{"tcp"}, 10*time.Second) })
	return liveBroker{url: "tcp://" + ln.Addr().String()}
}

// connect logs in with MQTT 3.1.1 and reports whether the broker accepted.
func (b liveBroker) connect(t testing.TB, clientID, username string, password []byte) bool {
	t.Helper()
	c := paho.NewClient(paho.NewClientOptions().AddBroker(b.url).SetClientID(clientID).SetUsername(username).
		SetPassword(string(password)).SetProtocolVersion(4).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(5 * time.Second))
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		t.Fatal("CONNECT not answered")
	}
	if tok.Error() != nil {
		return false
	}
	c.Disconnect(50)
	return true
}

// loginToken is a terminal's CONNECT password for now with a fresh nonce.
func loginToken(t testing.TB, term *keysvc.Terminal, up []byte) []byte {
	t.Helper()
	var n [8]byte
	_, _ = rand.Read(n[:])
	l := codec.Login{Identity: term.Identity(), Alg: term.Alg, TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(n[:]))}
	pw, err := l.Sign(up)
	if err != nil {
		t.Fatal(err)
	}
	return pw
}

// liveKeyService is a key service on an embedded store with one terminal.
func liveKeyService(t testing.TB) (*keysvc.Service, *keysvc.Terminal) {
	t.Helper()
	key := make([]byte, boltstore.MasterKeySize)
	_, _ = rand.Read(key)
	store, err := boltstore.Open(filepath.Join(t.TempDir(), "m2mguard.db"), boltstore.Options{MasterKey: key})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	svc, err := keysvc.New(keysvc.Options{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	term, err := svc.Register(context.Background(), keysvc.RegisterRequest{SN: testSN, IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		t.Fatal(err)
	}
	return svc, term
}

// TestFleetLoginTokenReplayRefused reproduces the first fleet-mode attack of
// SECURITY.md on
// two live brokers sharing one key service: a terminal's login token,
// accepted on A, is captured and replayed on B. With the per-broker replay
// guards of today B accepts it; with the fleet's claims B refuses it. It
// also spreads password guesses over both brokers: with the shared
// throttle the failures add up, so the genuine password from the guessing
// address is refused on B once the fleet has seen Free failures.
//
// M2MGUARD_FLEET_LOCAL=1 runs it with today's local guards (the defect).
func TestFleetLoginTokenReplayRefused(t *testing.T) {
	t.Parallel()
	local := os.Getenv("M2MGUARD_FLEET_LOCAL") != ""
	svc, term := liveKeyService(t)
	throttle := hook.ThrottleOptions{Free: 4, Base: time.Minute}
	var a, b liveBroker
	synced := func() {}
	if local {
		a = startLiveBroker(t, svc, replay.NewMemory(replay.Options{}), hook.NewThrottleTable(throttle))
		b = startLiveBroker(t, svc, replay.NewMemory(replay.Options{}), hook.NewThrottleTable(throttle))
	} else {
		c := newCluster(t, 3, nil)
		fa, fb := c.open("a", 0, nil), c.open("b", 1, nil)
		a = startLiveBroker(t, svc, fa, fa.Throttler(hook.NewThrottleTable(throttle)))
		b = startLiveBroker(t, svc, fb, fb.Throttler(hook.NewThrottleTable(throttle)))
		synced = func() { throttleSynced(t, fa, fb) }
	}
	user := term.IMEI + ":" + term.IMSI

	token := loginToken(t, term, term.Creds.Up)
	if !a.connect(t, testSN, user, token) {
		t.Fatal("the genuine login was refused on A")
	}
	if b.connect(t, testSN, user, token) {
		t.Error("a login token accepted on A was accepted again on B (replay)")
	}
	if !b.connect(t, testSN, user, loginToken(t, term, term.Creds.Up)) {
		t.Fatal("a fresh genuine login was refused on B")
	}

	// A success clears the pair everywhere; the guesses start after the
	// brokers heard of the successes.
	synced()
	// Guesses from one address, two on each broker: four in the fleet.
	wrong := []byte("0123456789abcdef")
	for _, br := range []liveBroker{a, b, a, b} {
		if br.connect(t, testSN, user, loginToken(t, term, wrong)) {
			t.Fatal("a wrong password was accepted")
		}
	}
	// The fifth failure (on A) starts a refusal period for this address in
	// the whole fleet; B hears of it within milliseconds.
	if a.connect(t, testSN, user, loginToken(t, term, wrong)) {
		t.Fatal("a wrong password was accepted")
	}
	synced()
	if b.connect(t, testSN, user, loginToken(t, term, term.Creds.Up)) {
		t.Error("B accepted a login from an address the fleet has seen 5 wrong passwords from (Free = 4)")
	}
}

// throttleSynced waits until each broker has applied every failure and
// success the other shared (the sharing is eventual: milliseconds).
func throttleSynced(t *testing.T, fs ...*Fleet) {
	t.Helper()
	checkFor(t, 5*time.Second, 5*time.Millisecond, func() error {
		var sent, applied float64
		for _, f := range fs {
			sent += float64(f.thr.queued.Load()) - testutil.ToFloat64(f.m.throttleDrop)
			applied += testutil.ToFloat64(f.m.throttleApply)
		}
		if want := sent * float64(len(fs)-1); applied != want {
			return fmt.Errorf("%v ops applied, want %v", applied, want)
		}
		return nil
	})
}

// TestFleetBusCarriesNoSecret: everything the package puts on NATS while
// live brokers log a terminal in and out, fail its logins, and the fleet
// claims, registers, publishes, requests and leases — every core message
// seen by a subscriber to ">" and every message left in the fleet's
// streams and buckets — and every log line is scanned for the terminal's
// passwords, basic key, login tokens and digests and the NATS password:
// none may appear.
func TestFleetBusCarriesNoSecret(t *testing.T) {
	t.Parallel()
	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	svc, term := liveKeyService(t)
	c := newCluster(t, 3, func(_ int, o *NodeOptions) { o.Logger = logger })
	quietLogs := func(o *Options) { o.Logger = logger; o.SweepEvery = 100 * time.Millisecond }
	fa, fb := c.open("a", 0, quietLogs), c.open("b", 1, quietLogs)

	sniffer, err := nats.Connect(c.url(2), nats.UserInfo(testUser, testPassword))
	if err != nil {
		t.Fatal(err)
	}
	defer sniffer.Close()
	var mu sync.Mutex
	var seen [][]byte
	if _, err := sniffer.Subscribe(">", func(m *nats.Msg) {
		mu.Lock()
		seen = append(seen, []byte(m.Subject), m.Data, []byte(fmt.Sprint(m.Header)))
		mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	if err := sniffer.Flush(); err != nil {
		t.Fatal(err)
	}

	throttle := hook.ThrottleOptions{Free: 3, Base: time.Minute}
	a := startLiveBroker(t, svc, fa, fa.Throttler(hook.NewThrottleTable(throttle)))
	b := startLiveBroker(t, svc, fb, fb.Throttler(hook.NewThrottleTable(throttle)))
	user := term.IMEI + ":" + term.IMSI
	var tokens [][]byte
	for _, br := range []liveBroker{a, b, a} {
		tok := loginToken(t, term, term.Creds.Up)
		tokens = append(tokens, tok)
		br.connect(t, testSN, user, tok)
		br.connect(t, testSN, user, tok) // the replay
		bad := loginToken(t, term, term.Creds.Down)
		tokens = append(tokens, bad)
		br.connect(t, testSN, user, bad)
	}
	ctx := context.Background()
	epoch, err := fa.Directory().Register(ctx, Entry{ClientID: testSN, Kind: KindTerminal, SN: testSN, Remote: "127.0.0.1:1", Protocol: 4, Since: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fb.Bus().Subscribe(func(Event) {}); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{EventRevoke, EventInvalidate} {
		if err := fa.Bus().Publish(ctx, Event{Kind: kind, SN: testSN, ClientID: testSN, Reason: "test"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := fb.Handle("sessions", func(context.Context, []byte) ([]byte, error) { return []byte(testSN), nil }); err != nil {
		t.Fatal(err)
	}
	checkFor(t, 5*time.Second, 10*time.Millisecond, func() error {
		_, err := fa.Request(ctx, "b", "sessions", nil)
		return err
	})
	if _, err := fa.Gather(ctx, "sessions", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := fa.Directory().Unregister(ctx, testSN, epoch); err != nil {
		t.Fatal(err)
	}
	throttleSynced(t, fa, fb)

	// Every message still in the fleet's streams.
	for _, stream := range []string{"KV_" + ReplayBucket, "KV_" + SessionBucket, "KV_" + BrokerBucket, "KV_" + LeaseBucket, EventStream} {
		s, err := fa.js.Stream(ctx, stream)
		if err != nil {
			t.Fatal(err)
		}
		info, err := s.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
			m, err := s.GetMsg(ctx, seq)
			if err != nil {
				continue // deleted
			}
			mu.Lock()
			seen = append(seen, []byte(m.Subject), m.Data, []byte(fmt.Sprint(m.Header)))
			mu.Unlock()
		}
	}
	secrets := map[string][]byte{"up": term.Creds.Up, "down": term.Creds.Down, "bk": term.Creds.BK, "nats password": []byte(testPassword)}
	for i, tok := range tokens {
		secrets[fmt.Sprint("token ", i)] = tok
		secrets[fmt.Sprint("digest ", i)] = tok[bytes.LastIndexByte(tok, '.')+1:]
	}
	forms := func(v []byte) [][]byte {
		return [][]byte{v, []byte(hex.EncodeToString(v)), []byte(base64.StdEncoding.EncodeToString(v)), []byte(base64.RawURLEncoding.EncodeToString(v))}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) < 50 {
		t.Fatalf("only %d messages seen: the scan saw nothing", len(seen))
	}
	all := append(seen, logs.Bytes())
	for name, v := range secrets {
		for _, f := range forms(v) {
			for _, m := range all {
				if bytes.Contains(m, f) {
					t.Fatalf("the %s appears on the bus or in a log line: %.200q", name, m)
				}
			}
		}
	}
	t.Logf("%d subjects, values and headers and %d bytes of log scanned", len(seen), logs.Len())
}

// syncBuffer is a bytes.Buffer for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.b.Bytes())
}

func (s *syncBuffer) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Len()
}
