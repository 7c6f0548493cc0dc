package fleettest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/freeport"
	"github.com/m2mguard/m2mguard/internal/rawmqtt"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
)

// appInbox is what an application's paho client received, by topic and
// payload.
type appInbox struct {
	mu  sync.Mutex
	got map[string]int
	n   int
}

func (b *appInbox) count(topic, payload string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.got[topic+" "+payload]
}

func (b *appInbox) total() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n
}

// matching counts the distinct messages whose topic and payload contain
// part and the deliveries beyond the first of each.
func (b *appInbox) matching(part string) (distinct, dups int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for k, n := range b.got {
		if strings.Contains(k, part) {
			distinct++
			dups += n - 1
		}
	}
	return distinct, dups
}

// appConnect connects application app (ClientID id) to m with paho,
// MQTT 3.1.1, clean session, and subscribes it to filter at QoS 1; it
// returns the inbox and the SUBACK's granted code.
func appConnect(t *testing.T, m *member, app *adminapi.App, id, filter string) (*appInbox, byte) {
	t.Helper()
	b := &appInbox{got: map[string]int{}}
	o := paho.NewClientOptions().AddBroker("tcp://" + m.b.Addr("tcp")).SetClientID(id).
		SetUsername(app.Name).SetPassword(app.Password).SetCleanSession(true).SetAutoReconnect(false).SetProtocolVersion(4)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Fatalf("app %s on %s: connect: %v", id, m.name, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	tok := c.Subscribe(filter, 1, func(_ paho.Client, msg paho.Message) {
		b.mu.Lock()
		b.got[msg.Topic()+" "+string(msg.Payload())]++
		b.n++
		b.mu.Unlock()
	})
	if !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Fatalf("app %s: subscribe: %v", id, tok.Error())
	}
	return b, tok.(*paho.SubscribeToken).Result()[filter]
}

// addApp registers an application through m's admin API; nil reach is
// the default (m2m/+/up/# and m2m/+/down/#).
func addApp(t *testing.T, m *member, name string, subscribe []string) *adminapi.App {
	t.Helper()
	app, err := m.api.AddApp(t.Context(), adminapi.AppRequest{Name: name, Subscribe: subscribe})
	if err != nil {
		t.Fatal(err)
	}
	return app
}

// rawTerminal logs terminal tm in on m without a session key (plaintext
// data), MQTT 3.1.1, with a will on willTopic unless it is empty.
func rawTerminal(t *testing.T, m *member, tm *keysvc.Terminal, willTopic, willPayload string) (net.Conn, *bufio.Reader) {
	t.Helper()
	var nonce [8]byte
	rand.Read(nonce[:])
	l := codec.Login{Identity: tm.Identity(), Alg: tm.Alg, TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(nonce[:]))}
	pw, err := l.Sign(tm.Creds.Up)
	if err != nil {
		t.Fatal(err)
	}
	cp := packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 600, ClientIdentifier: tm.SN,
		UsernameFlag: true, Username: []byte(tm.Identity().Username()), PasswordFlag: true, Password: pw}
	if willTopic != "" {
		cp.WillFlag, cp.WillTopic, cp.WillPayload, cp.WillQos = true, willTopic, []byte(willPayload), 1
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4, Connect: cp}
	var buf bytes.Buffer
	if err := rawmqtt.Encode(&buf, &pk); err != nil {
		t.Fatal(err)
	}
	c, code := dial(t, m.b.Addr("tcp"), buf.Bytes())
	if code != 0 {
		t.Fatalf("%s on %s: CONNACK %#x", tm.SN, m.name, code)
	}
	return c, bufio.NewReader(c)
}

// TestFleetUplinks: uplinks published through one broker reach the
// applications on the others, each once, also across a broker's restart;
// wills and retained uplinks too.
func TestFleetUplinks(t *testing.T) {
	v := vaulttest.Start(t)
	mqttPorts := freeport.Ports(t, 3) // a restarted broker listens where its terminals reconnect
	mode := fleetMode(t, 3)
	f := startFleet(t, v, 3, func(i int, cfg *broker.Config) {
		mode(i, cfg)
		cfg.MQTT.TCP = fmt.Sprintf("127.0.0.1:%d", mqttPorts[i])
		// B's application receives the whole fleet's uplinks: sized as
		// README says, so that an application slowed down by a loaded
		// machine is not dropped from (mochi drops what exceeds a
		// client's outbound queue; the default 256 did under load).
		cfg.MQTT.MaxWritesPending = 16384
	})
	A, B, C := f.members[0], f.members[1], f.members[2]

	// The application on B (default reach), clean session, QoS 1; and one
	// whose reach covers no terminal of this test.
	dash := addApp(t, B, "dash", nil)
	onB, granted := appConnect(t, B, dash, "dash-1", "m2m/+/up/#")
	if granted != 1 {
		t.Fatalf("dash's subscription granted %#x", granted)
	}
	narrow := addApp(t, B, "narrow", []string{"m2m/NOSUCHTERM/up/#"})
	onNarrowWide, grantedWide := appConnect(t, B, narrow, "narrow-1", "m2m/+/up/#")
	if grantedWide != 0x80 {
		t.Errorf("an application subscribed outside its reach: granted %#x, want 0x80", grantedWide)
	}
	onNarrow, _ := appConnect(t, B, narrow, "narrow-2", "m2m/NOSUCHTERM/up/#")

	// A plaintext terminal's will, left on A, reaches the application on B.
	t.Run("WillReachesOtherBroker", func(t *testing.T) {
		tm := f.register(t, 0, "ROUTEWILL1")
		c, _ := rawTerminal(t, A, tm, "m2m/ROUTEWILL1/up/status", "offline")
		checkFor(t, 5*time.Second, "A holds the terminal's session", func() bool { return len(f.holders(tm.SN)) == 1 })
		c.Close() // no DISCONNECT: the will is sent
		checkFor(t, 10*time.Second, "the will reaches the application on B", func() bool {
			return onB.count("m2m/ROUTEWILL1/up/status", "offline") == 1
		})
	})

	// A retained uplink published on A is retained on C: an application
	// that subscribes there afterwards receives it.
	t.Run("RetainedSeenLaterOnOtherBroker", func(t *testing.T) {
		tm := f.register(t, 0, "ROUTERET1")
		c, r := rawTerminal(t, A, tm, "", "")
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true}, ProtocolVersion: 4,
			TopicName: "m2m/ROUTERET1/up/state", Payload: []byte("on"), PacketID: 1}
		var buf bytes.Buffer
		if err := rawmqtt.Encode(&buf, &pk); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(buf.Bytes()); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		for { // the platform may write to the terminal first (its key topic)
			ack, err := rawmqtt.Read(r, 4, 0)
			if err != nil {
				t.Fatalf("retained uplink: %v; want a PUBACK", err)
			}
			if ack.FixedHeader.Type == packets.Puback {
				break
			}
		}
		checkFor(t, 10*time.Second, "B's application got it live", func() bool { return onB.count("m2m/ROUTERET1/up/state", "on") == 1 })
		checkFor(t, 10*time.Second, "C retains it", func() bool {
			_, ok := C.b.Server().Topics.Retained.Get("m2m/ROUTERET1/up/state")
			return ok
		})
		later, _ := appConnect(t, C, dash, "dash-later", "m2m/ROUTERET1/up/#")
		checkFor(t, 5*time.Second, "an application subscribing later on C gets the retained uplink", func() bool {
			return later.count("m2m/ROUTERET1/up/state", "on") == 1
		})
	})

	// 10,000 QoS 1 uplinks from terminals with session keys on A and C
	// (sealed on the wire, opened by their broker); A restarts in the
	// middle. The application on B receives every one; duplicates only
	// for what was in flight on A when it stopped.
	t.Run("TenThousandAcrossRestart", func(t *testing.T) {
		total := 10_000
		if testing.Short() && os.Getenv("M2MGUARD_ROUTE_FULL") == "" {
			total = 2_000
		}
		type term struct {
			sn string
			m  *member
			c  *client.Client
		}
		var terms []*term
		// Eight terminals publishing at once: each waits for its PUBACK,
		// which waits for JetStream's replicated acknowledgement.
		for i, sn := range []string{"ROUTEA1", "ROUTEA2", "ROUTEA3", "ROUTEA4", "ROUTEC1", "ROUTEC2", "ROUTEC3", "ROUTEC4"} {
			m := A
			if i >= 4 {
				m = C
			}
			tm := f.register(t, 0, sn)
			rec := &client.Record{Identity: tm.Identity(), Alg: tm.Alg, Current: client.Credentials{
				Up: tm.Creds.Up, UpExp: tm.Creds.UpExp, Down: tm.Creds.Down, DownExp: tm.Creds.DownExp, BK: tm.Creds.BK, BKExp: tm.Creds.BKExp}}
			c, err := client.New(client.Config{Brokers: []string{"tcp://" + m.b.Addr("tcp")}, Identity: rec.Identity, Alg: rec.Alg,
				Store: client.NewMemStore(rec), SessionKey: true, CleanSession: true, MaxReconnectInterval: 250 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			err = c.Connect(ctx)
			cancel()
			if err != nil {
				t.Fatalf("%s on %s: %v", sn, m.name, err)
			}
			terms = append(terms, &term{sn: sn, m: m, c: c})
		}
		for _, tr := range terms {
			checkFor(t, 5*time.Second, tr.sn+"'s session has a key", func() bool {
				for _, s := range tr.m.b.Hook().Sessions() {
					if s.ClientID == tr.sn {
						return s.SessionKey
					}
				}
				return false
			})
		}

		per := total / len(terms)
		var sent, retried atomic.Int64
		start := time.Now()
		var wg sync.WaitGroup
		errs := make(chan error, len(terms))
		for _, tr := range terms {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < per; {
					ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
					err := tr.c.Publish(ctx, "data", fmt.Appendf(nil, "%s-%d", tr.sn, i), 1)
					cancel()
					if err != nil {
						// Not acknowledged (the session ended with A's
						// stop, or the broker refused it): again.
						if t.Context().Err() != nil || retried.Add(1) > 1000 {
							errs <- fmt.Errorf("%s: message %d: %w", tr.sn, i, err)
							return
						}
						continue
					}
					i++
					sent.Add(1)
				}
			}()
		}
		checkFor(t, 120*time.Second, "half of the uplinks acknowledged", func() bool { return sent.Load() >= int64(total/2) })
		t.Logf("restarting A after %d uplinks acknowledged", sent.Load())
		restartAt := time.Now()
		f.restart(t, 0)
		t.Logf("A restarted in %v", time.Since(restartAt).Round(time.Millisecond))
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		elapsed := time.Since(start)
		sentAll := time.Now()
		if !testwait.Until(60*time.Second, func() bool {
			n, _ := onB.matching("/up/data ")
			return n >= total
		}) {
			n, _ := onB.matching("/up/data ")
			t.Fatalf("B's application received %d of %d uplinks; B's mochi dropped %d messages (outbound queues full)", n, total, atomic.LoadInt64(&B.b.Server().Info.MessagesDropped))
		}
		t.Logf("B's application had every uplink %v after the last was acknowledged", time.Since(sentAll).Round(time.Millisecond))
		distinct, dups := onB.matching("/up/data ")
		for _, tr := range terms {
			for i := range per {
				if onB.count("m2m/"+tr.sn+"/up/data", fmt.Sprintf("%s-%d", tr.sn, i)) == 0 {
					t.Fatalf("%s-%d lost", tr.sn, i)
				}
			}
		}
		t.Logf("%d uplinks acknowledged in %v (%d retried after the restart or a refusal); B's application: %d distinct, %d duplicates",
			total, elapsed.Round(time.Millisecond), retried.Load(), distinct, dups)
		// Every duplicate is an uplink a terminal sent again because its
		// acknowledgement did not come (A stopped with it in flight, or
		// a refusal while JetStream elected a leader): the routing itself
		// delivers each stored message once to B.
		// Besides, B's consumer delivers again what it injected but
		// whose acknowledgement was lost when A's NATS node (perhaps the
		// consumer's leader) stopped: the acknowledgements in flight at
		// that moment, a handful.
		if bound := int(retried.Load()) + 16; dups > bound {
			t.Errorf("%d duplicates at B after %d uplinks sent again, want at most %d", dups, retried.Load(), bound)
		}
		if distinct != total {
			t.Errorf("%d distinct uplinks at B, want %d", distinct, total)
		}
		// Sealed on the terminals' side: C (not restarted) accepted
		// every uplink of its terminals as an envelope of their session.
		for _, s := range C.b.Hook().Sessions() {
			if strings.HasPrefix(s.ClientID, "ROUTEC") && (!s.SessionKey || s.UplinkSeq < uint64(per)) {
				t.Errorf("%s on C: session key %v, highest uplink envelope %d; want sealed uplinks, at least %d", s.ClientID, s.SessionKey, s.UplinkSeq, per)
			}
		}
	})

	if n := onNarrow.total() + onNarrowWide.total(); n != 0 {
		t.Errorf("the application outside the terminals' reach received %d messages", n)
	}
}
