package fleet

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
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
func startLiveBroker(t *testing.T, svc *keysvc.Service, rg hook.ReplayGuard, th hook.Throttler) liveBroker {
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
func (b liveBroker) connect(t *testing.T, clientID, username string, password []byte) bool {
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
func loginToken(t *testing.T, term *keysvc.Terminal, up []byte) []byte {
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

// TestFleetLoginTokenReplayRefused reproduces issue 15's first finding on
// two live brokers sharing one key service: a terminal's login token,
// accepted on A, is captured and replayed on B. With the per-broker replay
// guards of today B accepts it; with the fleet's claims B refuses it. It
// also spreads password guesses over both brokers: with the shared
// throttle the failures add up, so the genuine password from the guessing
// address is refused on B once the fleet has seen Free failures.
//
// M2MGUARD_FLEET_LOCAL=1 runs it with today's local guards (the defect).
func TestFleetLoginTokenReplayRefused(t *testing.T) {
	local := os.Getenv("M2MGUARD_FLEET_LOCAL") != ""
	dir := t.TempDir()
	key := make([]byte, boltstore.MasterKeySize)
	_, _ = rand.Read(key)
	store, err := boltstore.Open(filepath.Join(dir, "m2mguard.db"), boltstore.Options{MasterKey: key})
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
