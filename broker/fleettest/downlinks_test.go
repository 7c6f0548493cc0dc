package fleettest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/fleetroute"
	"github.com/m2mguard/m2mguard/internal/rawmqtt"
	"github.com/m2mguard/m2mguard/internal/tcptap"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
)

// downlinkQueue is cluster.downlink_queue in TestFleetDownlinks.
const downlinkQueue = 5

// TestFleetDownlinks: downlinks published through one broker reach the
// terminal on another, sealed by the broker that delivers them under the
// session key it issued; a terminal that was offline receives, wherever it
// logs in next, what was published meanwhile (the newest downlink_queue
// of it), in order; a downlink outside the application's reach is refused
// before it reaches the fleet's stream.
func TestFleetDownlinks(t *testing.T) {
	v := vaulttest.Start(t)
	mode := fleetMode(t, 3)
	f := startFleet(t, v, 3, func(i int, cfg *broker.Config) {
		mode(i, cfg)
		cfg.Cluster.DownlinkQueue = downlinkQueue
	})
	A, B, C := f.members[0], f.members[1], f.members[2]
	ctx := t.Context()
	app, err := A.api.AddApp(ctx, adminapi.AppRequest{Name: "downapp",
		Publish: []string{"m2m/FLEETDOWN1/down/#", "m2m/FLEETDOWN2/down/#"}, Subscribe: []string{"m2m/+/up/#"}})
	if err != nil {
		t.Fatal(err)
	}
	// The applications log in one after another: their logins (argon2id)
	// are bounded per address (auth.app_concurrency_per_addr).
	pubs := make([]paho.Client, 3)
	for i := range pubs {
		pubs[i] = appClient(t, B, fmt.Sprintf("downapp-%d", i+1), app.Password)
	}

	// A downlink to a terminal outside the application's publish reach is
	// refused by the m2mguard hook's ACL (3.1.1, QoS 1: the connection
	// ends) and never reaches the stream. (Not in parallel: it counts
	// B's appends.)
	t.Run("OutsideReachNotStored", func(t *testing.T) {
		tm := f.register(t, 1, "FLEETDOWN3")
		appended := metric(t, B, "m2mguard_fleet_route_downlinks_appended_total")
		pub := pubs[2]
		tok := pub.Publish("m2m/FLEETDOWN3/down/cmd", 1, false, "not-yours")
		checkFor(t, 5*time.Second, "the application disconnected", func() bool { return !pub.IsConnectionOpen() })
		if tok.WaitTimeout(100*time.Millisecond) && tok.Error() == nil {
			t.Error("a downlink outside the application's reach was acknowledged")
		}
		if n := subjectCount(t, B, tm.SN); n != 0 {
			t.Errorf("%d downlinks stored for a terminal outside the application's reach", n)
		}
		if got := metric(t, B, "m2mguard_fleet_route_downlinks_appended_total"); got != appended {
			t.Errorf("appended went from %v to %v", appended, got)
		}
	})

	// Live: the terminal holds its session on C, the application publishes
	// through B.
	t.Run("AcrossBrokers", func(t *testing.T) {
		t.Parallel()
		tm := f.register(t, 2, "FLEETDOWN1")
		wire := newWireTap(t, C.b.Addr("tcp"), tm)
		term, data := referenceTerminal(t, tm, wire.addr)
		checkFor(t, 5*time.Second, "C's session ready for downlinks", func() bool { return C.b.Hook().DownlinkReady(tm.SN) })
		pub := pubs[0]
		publishQoS1(t, pub, "m2m/FLEETDOWN1/down/cmd", "open-the-valve")
		got := data.await(t, 1)
		if got[0] != "cmd open-the-valve" {
			t.Fatalf("the terminal on C received %q", got[0])
		}
		wire.checkSealed(t, "m2m/FLEETDOWN1/down/cmd", "open-the-valve")
		// C deletes a downlink after handing it to mochi, which may write
		// it to the terminal first.
		checkFor(t, 5*time.Second, "the delivered downlink deleted from the stream", func() bool { return subjectCount(t, A, tm.SN) == 0 })
		term.Close()
	})

	// Offline: the terminal's session on C is offline; downlinks
	// published meanwhile wait in the stream (the newest downlink_queue of
	// them); it logs in on A and receives them there, in order, sealed
	// under A's session key.
	t.Run("OfflineThenAnotherBroker", func(t *testing.T) {
		t.Parallel()
		tm := f.register(t, 2, "FLEETDOWN2")
		term, _ := referenceTerminal(t, tm, C.b.Addr("tcp"))
		checkFor(t, 5*time.Second, "C's session ready for downlinks", func() bool { return C.b.Hook().DownlinkReady(tm.SN) })
		term.Close()
		checkFor(t, 5*time.Second, "the terminal offline", func() bool { return !C.b.Hook().DownlinkReady(tm.SN) })

		dropped := metric(t, B, "m2mguard_fleet_route_downlinks_dropped_total")
		pub := pubs[1]
		const n = downlinkQueue + 3
		for i := range n {
			publishQoS1(t, pub, "m2m/FLEETDOWN2/down/cfg", fmt.Sprintf("set-point-value-%d", i))
		}
		if got := subjectCount(t, B, tm.SN); got != downlinkQueue {
			t.Fatalf("%d downlinks stored for the offline terminal, want downlink_queue %d", got, downlinkQueue)
		}
		// A lower bound in a JetStream cluster: an append right behind
		// the previous one may find JetStream dropping the oldest itself
		// (fleetroute.Downlinks, "Guarantees").
		if got := metric(t, B, "m2mguard_fleet_route_downlinks_dropped_total") - dropped; got < 1 || got > n-downlinkQueue {
			t.Errorf("dropped %v, want 1 to %d", got, n-downlinkQueue)
		}

		wire := newWireTap(t, A.b.Addr("tcp"), tm)
		_, data := referenceTerminal(t, tm, wire.addr)
		got := data.await(t, downlinkQueue)
		var want []string
		for i := n - downlinkQueue; i < n; i++ {
			want = append(want, fmt.Sprintf("cfg set-point-value-%d", i))
		}
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Fatalf("the terminal on A received %v, want %v", got, want)
		}
		for i := n - downlinkQueue; i < n; i++ {
			wire.checkSealed(t, "m2m/FLEETDOWN2/down/cfg", fmt.Sprintf("set-point-value-%d", i))
		}
		checkFor(t, 5*time.Second, "the terminal's subject empty", func() bool { return subjectCount(t, A, tm.SN) == 0 })
	})

}

// downData collects what a reference terminal's OnData receives: "sub
// payload".
type downData struct {
	mu  sync.Mutex
	got []string
	ch  chan struct{}
}

func (d *downData) add(sub string, payload []byte) {
	d.mu.Lock()
	d.got = append(d.got, sub+" "+string(payload))
	d.mu.Unlock()
	select {
	case d.ch <- struct{}{}:
	default:
	}
}

// await returns the first n messages, failing t after 20 s.
func (d *downData) await(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		d.mu.Lock()
		got := append([]string(nil), d.got...)
		d.mu.Unlock()
		if len(got) >= n {
			return got[:n]
		}
		select {
		case <-d.ch:
		case <-deadline:
			t.Fatalf("received %d downlinks %v, want %d", len(got), got, n)
		}
	}
}

// referenceTerminal connects tm with the client library, with a session
// key and a persistent session, through addr.
func referenceTerminal(t *testing.T, tm *keysvc.Terminal, addr string) (*client.Client, *downData) {
	t.Helper()
	rec := &client.Record{Identity: tm.Identity(), Alg: tm.Alg, Current: client.Credentials{
		Up: tm.Creds.Up, UpExp: tm.Creds.UpExp, Down: tm.Creds.Down, DownExp: tm.Creds.DownExp, BK: tm.Creds.BK, BKExp: tm.Creds.BKExp}}
	data := &downData{ch: make(chan struct{}, 1)}
	c, err := client.New(client.Config{Brokers: []string{"tcp://" + addr}, Identity: rec.Identity, Alg: rec.Alg,
		Store: client.NewMemStore(rec), SessionKey: true, OnData: data.add})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	return c, data
}

// appClient connects an application (3.1.1) to m.
func appClient(t *testing.T, m *member, clientID, password string) paho.Client {
	t.Helper()
	o := paho.NewClientOptions().AddBroker("tcp://" + m.b.Addr("tcp")).SetClientID(clientID).
		SetUsername(strings.SplitN(clientID, "-", 2)[0]).SetPassword(password).SetCleanSession(true).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(10 * time.Second)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Fatalf("application %s on %s: %v", clientID, m.name, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}

func publishQoS1(t *testing.T, c paho.Client, topic, payload string) {
	t.Helper()
	if tok := c.Publish(topic, 1, false, payload); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish %s: not acknowledged (%v)", topic, tok.Error())
	}
}

// subjectCount is the number of downlinks stored for sn, asked through m's
// fleet connection.
func subjectCount(t *testing.T, m *member, sn string) uint64 {
	t.Helper()
	js, err := jetstream.New(m.b.Fleet().Conn())
	if err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(t.Context(), fleetroute.DownlinkStream)
	if err != nil {
		t.Fatal(err)
	}
	subj := fleetroute.DownlinkPrefix + sn // serial numbers need no escaping
	info, err := s.Info(t.Context(), jetstream.WithSubjectFilter(subj))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Subjects[subj]
}

// wireTap is a TCP proxy in front of a broker that reads what the broker
// writes to one terminal: its session key (from the sk, unwrapped with the
// terminal's basic key) and the payloads of its downlink PUBLISHes.
type wireTap struct {
	addr string
	tm   *keysvc.Terminal

	mu   sync.Mutex
	keys [][]byte              // session keys, in order of issue
	down map[string][]sealedPk // topic → payloads as written, with the key current then
}

type sealedPk struct {
	payload []byte
	key     []byte
}

func newWireTap(t *testing.T, broker string, tm *keysvc.Terminal) *wireTap {
	t.Helper()
	w := &wireTap{tm: tm, down: map[string][]sealedPk{}}
	w.addr = tcptap.Start(t, broker, func(dst io.Writer, src io.Reader) {
		w.read(bufio.NewReader(io.TeeReader(src, dst)))
		io.Copy(dst, src)
	})
	return w
}

// read parses what the broker writes (3.1.1) until the stream ends or
// cannot be parsed.
func (w *wireTap) read(r *bufio.Reader) {
	for {
		pk, err := rawmqtt.Read(r, 4, 0)
		if err != nil {
			return
		}
		if pk.FixedHeader.Type != packets.Publish {
			continue
		}
		w.mu.Lock()
		switch kind, _ := codec.ParseTopic(pk.TopicName); kind {
		case codec.TopicKey:
			if m, err := codec.ParseControl(pk.Payload); err == nil && m.Kind == codec.KindSK {
				if ks, err := codec.UnwrapSessionKey(w.tm.Creds.BK, w.tm.SN, m.SID, m.Wrapped); err == nil {
					w.keys = append(w.keys, ks)
				}
			}
		case codec.TopicDown:
			var key []byte
			if len(w.keys) > 0 {
				key = w.keys[len(w.keys)-1]
			}
			w.down[pk.TopicName] = append(w.down[pk.TopicName], sealedPk{bytes.Clone(pk.Payload), key})
		}
		w.mu.Unlock()
	}
}

// checkSealed: a downlink written on topic is an envelope, not the
// plaintext, and opens to plain under the session key this broker issued
// on that connection. (The tap parses what it has passed on: it may be a
// moment behind the terminal.)
func (w *wireTap) checkSealed(t *testing.T, topic, plain string) {
	t.Helper()
	checkFor(t, 5*time.Second, "an envelope of "+plain+" on the wire", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, p := range w.down[topic] {
			if bytes.Contains(p.payload, []byte(plain)) {
				t.Fatalf("downlink %q written in plaintext on %s", plain, topic)
			}
			if p.key == nil || len(p.payload) != len(plain)+codec.EnvelopeOverhead {
				continue
			}
			aead, err := codec.NewAEAD(p.key)
			if err != nil {
				t.Fatal(err)
			}
			if _, got, err := codec.Open(nil, aead, codec.Downlink, topic, p.payload); err == nil && string(got) == plain {
				return true
			}
		}
		return false
	})
}
