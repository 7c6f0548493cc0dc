package fleetroute

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/internal/rawmqtt"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

var quiet = slog.New(slog.DiscardHandler)

// startNode starts a single embedded NATS node with JetStream.
func startNode(t *testing.T) *fleet.Node {
	t.Helper()
	n, err := fleet.StartNode(fleet.NodeOptions{Name: "n1", StoreDir: t.TempDir(), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Shutdown)
	return n
}

// routed is one test broker: a mochi server with mochi's allow-all auth
// and Uplinks on its own fleet connection.
type routed struct {
	f    *fleet.Fleet
	srv  *mqtt.Server
	up   *Uplinks
	reg  *prometheus.Registry
	addr string
	once sync.Once
}

// startRouted opens broker id's fleet on node and starts its server.
func startRouted(t *testing.T, node *fleet.Node, id string, mod func(*UplinkOptions)) *routed {
	t.Helper()
	return startRoutedThen(t, node, id, mod, nil)
}

// startRoutedThen is startRouted calling beforeStart between the server's
// Serve and the start of Uplinks.
func startRoutedThen(t *testing.T, node *fleet.Node, id string, mod func(*UplinkOptions), beforeStart func(*mqtt.Server)) *routed {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	f, err := fleet.Open(ctx, fleet.Options{URLs: []string{node.ClientURL()}, BrokerID: id, SweepEvery: -1, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	r := &routed{f: f, reg: prometheus.NewRegistry()}
	r.srv = mqtt.New(&mqtt.Options{InlineClient: true, Logger: quiet})
	if err := r.srv.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}
	o := UplinkOptions{Fleet: f, Server: r.srv, AckTimeout: 500 * time.Millisecond, Logger: quiet, Registerer: r.reg}
	if mod != nil {
		mod(&o)
	}
	r.up, err = NewUplinks(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.srv.AddHook(r.up, nil); err != nil {
		t.Fatal(err)
	}
	l := listeners.NewTCP(listeners.Config{ID: "tcp", Address: "127.0.0.1:0"})
	if err := r.srv.AddListener(l); err != nil {
		t.Fatal(err)
	}
	if err := r.srv.Serve(); err != nil {
		t.Fatal(err)
	}
	r.addr = l.Address()
	if beforeStart != nil {
		beforeStart(r.srv)
	}
	if err := r.up.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.stop)
	return r
}

// stop closes Uplinks, then the server (as the broker does), then the
// fleet connection; a second call does nothing.
func (r *routed) stop() {
	r.once.Do(func() {
		r.up.Close()
		r.srv.Close()
		r.f.Close()
	})
}

// inbox collects what a paho client receives, by topic and payload.
type inbox struct {
	mu  sync.Mutex
	got map[string]int
	n   int
}

func (b *inbox) count(topic, payload string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.got[topic+" "+payload]
}

func (b *inbox) total() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n
}

// subscribe connects a paho client to addr and subscribes it to filter
// at QoS 1.
func subscribe(t *testing.T, addr, id, filter string) *inbox {
	t.Helper()
	b := &inbox{got: map[string]int{}}
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetAutoReconnect(false)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect %s: %v", id, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	tok := c.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) {
		b.mu.Lock()
		b.got[m.Topic()+" "+string(m.Payload())]++
		b.n++
		b.mu.Unlock()
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe %s: %v", id, tok.Error())
	}
	return b
}

// publisher connects a paho client to addr.
func publisher(t *testing.T, addr, id string) paho.Client {
	t.Helper()
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetAutoReconnect(false))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect %s: %v", id, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c
}

func publish(t *testing.T, c paho.Client, topic string, qos byte, retain bool, payload string) {
	t.Helper()
	tok := c.Publish(topic, qos, retain, payload)
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish %s: %v", topic, tok.Error())
	}
}

// TestUplinksReachOtherBrokerOnce: uplinks published on A reach B's
// subscriber exactly once each, and A's own subscriber exactly once (an
// injected message is not routed back); other topics stay on A.
func TestUplinksReachOtherBrokerOnce(t *testing.T) {
	t.Parallel()
	node := startNode(t)
	A := startRouted(t, node, "a", nil)
	B := startRouted(t, node, "b", nil)
	onA := subscribe(t, A.addr, "app-a", "#")
	onB := subscribe(t, B.addr, "app-b", "#")
	pub := publisher(t, A.addr, "T1")

	const n = 50
	for i := range n {
		publish(t, pub, "m2m/T1/up/t", 1, false, fmt.Sprint("q1-", i))
	}
	publish(t, pub, "m2m/T1/up/x.y/", 2, false, "q2")
	publish(t, pub, "m2m/T1/up/z", 0, false, "q0")
	publish(t, pub, "m2m/T1/down/d", 1, false, "a downlink") // not an uplink: not routed by Uplinks
	publish(t, pub, "other/topic", 1, false, "other")
	want := n + 4
	testwait.For(t, 10*time.Second, "A's subscriber gets everything", func() bool { return onA.total() >= want })
	testwait.For(t, 10*time.Second, "B's subscriber gets the uplinks", func() bool { return onB.total() >= n+2 })
	testwait.Never(t, 300*time.Millisecond, "a message delivered twice or a non-uplink routed", func() bool {
		return onA.total() > want || onB.total() > n+2
	})
	for i := range n {
		p := fmt.Sprint("q1-", i)
		if onA.count("m2m/T1/up/t", p) != 1 || onB.count("m2m/T1/up/t", p) != 1 {
			t.Fatalf("%s: A got %d, B %d; want 1 each", p, onA.count("m2m/T1/up/t", p), onB.count("m2m/T1/up/t", p))
		}
	}
	if onB.count("m2m/T1/up/x.y/", "q2") != 1 || onB.count("m2m/T1/up/z", "q0") != 1 {
		t.Errorf("B: QoS 2 %d, QoS 0 %d; want 1 each", onB.count("m2m/T1/up/x.y/", "q2"), onB.count("m2m/T1/up/z", "q0"))
	}
	if got := testutil.ToFloat64(B.up.m.injected); got != n+2 {
		t.Errorf("B injected %v, want %d", got, n+2)
	}
	if got := testutil.ToFloat64(A.up.m.injected); got != 0 {
		t.Errorf("A injected %v of its own, want 0", got)
	}
	if got := testutil.ToFloat64(A.up.m.forwarded.WithLabelValues("publish")); got != n+2 {
		t.Errorf("A forwarded %v, want %d", got, n+2)
	}
}

// TestRetainedUplinksFleetWide: a retained uplink published on A is
// retained on B, and a broker started afterwards (C) has it; an empty
// retained payload clears it everywhere, for a broker started later too.
func TestRetainedUplinksFleetWide(t *testing.T) {
	t.Parallel()
	node := startNode(t)
	A := startRouted(t, node, "a", nil)
	B := startRouted(t, node, "b", nil)
	pub := publisher(t, A.addr, "T2")
	publish(t, pub, "m2m/T2/up/state", 1, true, "on")
	publish(t, pub, "m2m/T2/up/gone", 1, true, "soon cleared")
	publish(t, pub, "m2m/T2/up/gone", 1, true, "")
	// A live subscriber on B first: once it has the live message, B has
	// retained it (mochi retains before it delivers).
	live := subscribe(t, B.addr, "app-live", "m2m/T2/up/state")
	_ = live
	testwait.For(t, 10*time.Second, "B retains the uplink", func() bool {
		_, ok := B.srv.Topics.Retained.Get("m2m/T2/up/state")
		return ok
	})
	onB := subscribe(t, B.addr, "app-b", "m2m/T2/up/#")
	testwait.For(t, 5*time.Second, "B's new subscriber gets the retained uplink", func() bool {
		return onB.count("m2m/T2/up/state", "on") == 1
	})

	C := startRouted(t, node, "c", nil) // after the fact: loads the retained set at Start
	onC := subscribe(t, C.addr, "app-c", "m2m/T2/up/#")
	testwait.For(t, 5*time.Second, "C's subscriber gets the retained uplink", func() bool {
		return onC.count("m2m/T2/up/state", "on") == 1
	})
	testwait.Never(t, 300*time.Millisecond, "a cleared retained uplink delivered", func() bool {
		return onC.count("m2m/T2/up/gone", "soon cleared") > 0 || onB.count("m2m/T2/up/gone", "soon cleared") > 0
	})
}

// TestWillForwarded: the will of a client whose connection drops on A
// reaches B's subscriber.
func TestWillForwarded(t *testing.T) {
	t.Parallel()
	node := startNode(t)
	A := startRouted(t, node, "a", nil)
	B := startRouted(t, node, "b", nil)
	onB := subscribe(t, B.addr, "app-b", "m2m/+/up/#")

	c, r := rawConnect(t, A.addr, 4, &packets.ConnectParams{WillFlag: true, WillTopic: "m2m/T3/up/status", WillPayload: []byte("lost")})
	_ = r
	c.Close() // no DISCONNECT: mochi sends the will
	testwait.For(t, 10*time.Second, "B gets A's client's will", func() bool { return onB.count("m2m/T3/up/status", "lost") == 1 })
	// A counts the will once JetStream's acknowledgement is back, which
	// may be after B has it.
	testwait.For(t, 10*time.Second, "A counts one forwarded will", func() bool {
		return testutil.ToFloat64(A.up.m.forwarded.WithLabelValues("will")) == 1
	})
	testwait.Never(t, 200*time.Millisecond, "A counts a second will", func() bool {
		return testutil.ToFloat64(A.up.m.forwarded.WithLabelValues("will")) > 1
	})
}

// rawConnect opens a raw MQTT connection (version 4 or 5) to addr with a
// clean session and the will of extra, and reads the CONNACK.
func rawConnect(t *testing.T, addr string, version byte, extra *packets.ConnectParams) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	cp := packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: fmt.Sprintf("raw-%d-%p", version, c)}
	if extra != nil {
		cp.WillFlag, cp.WillTopic, cp.WillPayload = extra.WillFlag, extra.WillTopic, extra.WillPayload
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: version, Connect: cp}
	var buf bytes.Buffer
	if err := rawmqtt.Encode(&buf, &pk); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	ack, err := rawmqtt.Read(r, version, 0)
	if err != nil || ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != 0 {
		t.Fatalf("connack: %+v, %v", ack.FixedHeader, err)
	}
	return c, r
}

// TestRefusedWhenStreamUnavailable: with JetStream gone, a QoS 1 uplink
// is neither acknowledged nor delivered, and its client is disconnected
// (MQTT 5 with DISCONNECT 0x89), so that it sends it again; a QoS 0
// uplink is still delivered locally.
func TestRefusedWhenStreamUnavailable(t *testing.T) {
	t.Parallel()
	node := startNode(t)
	A := startRouted(t, node, "a", nil)
	onA := subscribe(t, A.addr, "app-a", "m2m/+/up/#")
	node.Shutdown()

	for _, version := range []byte{4, 5} {
		c, r := rawConnect(t, A.addr, version, nil)
		send := func(qos byte, payload string) {
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, ProtocolVersion: version,
				TopicName: "m2m/T4/up/t", Payload: []byte(payload), PacketID: 7}
			var buf bytes.Buffer
			if err := rawmqtt.Encode(&buf, &pk); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Write(buf.Bytes()); err != nil {
				t.Fatal(err)
			}
		}
		q0 := fmt.Sprint("qos0-v", version)
		send(0, q0)
		testwait.For(t, 5*time.Second, "the QoS 0 uplink delivered locally", func() bool { return onA.count("m2m/T4/up/t", q0) == 1 })
		send(1, fmt.Sprint("qos1-v", version))
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		pk, err := rawmqtt.Read(r, version, 0)
		switch {
		case version == 5 && err == nil && pk.FixedHeader.Type == packets.Disconnect && pk.ReasonCode == packets.ErrServerBusy.Code:
			if _, err := rawmqtt.Read(r, version, 0); err != io.EOF {
				t.Errorf("v5: after DISCONNECT: %v, want the connection closed", err)
			}
		case version == 4 && err == io.EOF:
		default:
			t.Fatalf("v%d: after a refused QoS 1 uplink: %+v (reason %#x), %v; want the connection closed without a PUBACK", version, pk.FixedHeader, pk.ReasonCode, err)
		}
		if n := onA.count("m2m/T4/up/t", fmt.Sprint("qos1-v", version)); n != 0 {
			t.Errorf("v%d: the refused uplink was delivered locally %d times", version, n)
		}
	}
	if got := testutil.ToFloat64(A.up.m.refused); got != 2 {
		t.Errorf("refused %v, want 2", got)
	}
}

// TestConsumerResumesAfterRestart: a broker that stops and starts again
// (the same broker id, so the same durable consumer) receives the uplinks
// published while it was down, and not again those it had injected and
// acknowledged before.
func TestConsumerResumesAfterRestart(t *testing.T) {
	t.Parallel()
	node := startNode(t)
	A := startRouted(t, node, "a", nil)
	var mu sync.Mutex
	got := map[string]int{}
	record := func(srv *mqtt.Server) {
		err := srv.Subscribe("m2m/+/up/#", 1, func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
			mu.Lock()
			got[string(pk.Payload)]++
			mu.Unlock()
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	count := func(p string) int {
		mu.Lock()
		defer mu.Unlock()
		return got[p]
	}
	B := startRoutedThen(t, node, "b", nil, record)
	pub := publisher(t, A.addr, "T5")
	for i := range 10 {
		publish(t, pub, "m2m/T5/up/t", 1, false, fmt.Sprint("before-", i))
	}
	testwait.For(t, 10*time.Second, "B injects the first ten", func() bool { return count("before-9") == 1 })
	B.stop()
	for i := range 10 {
		publish(t, pub, "m2m/T5/up/t", 1, false, fmt.Sprint("while-down-", i))
	}
	startRoutedThen(t, node, "b", nil, record)
	testwait.For(t, 10*time.Second, "B, back, injects what was published while it was down", func() bool {
		for i := range 10 {
			if count(fmt.Sprint("while-down-", i)) != 1 {
				return false
			}
		}
		return true
	})
	testwait.Never(t, 300*time.Millisecond, "B injects an uplink again", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, n := range got {
			if n > 1 {
				return true
			}
		}
		return false
	})
}

// TestTooLargeStaysLocal: an uplink larger than NATS carries is
// acknowledged and delivered on its own broker only, and counted; it is
// not refused (its client would send it again forever).
func TestTooLargeStaysLocal(t *testing.T) {
	t.Parallel()
	node := startNode(t)
	A := startRouted(t, node, "a", nil)
	B := startRouted(t, node, "b", nil)
	onA := subscribe(t, A.addr, "app-a", "m2m/+/up/#")
	onB := subscribe(t, B.addr, "app-b", "m2m/+/up/#")
	pub := publisher(t, A.addr, "T6")
	big := string(bytes.Repeat([]byte("x"), 1<<20+1))
	publish(t, pub, "m2m/T6/up/big", 1, false, big) // acknowledged: publish fails the test otherwise
	publish(t, pub, "m2m/T6/up/small", 1, false, "after")
	testwait.For(t, 10*time.Second, "B gets the small uplink after it", func() bool { return onB.count("m2m/T6/up/small", "after") == 1 })
	testwait.For(t, 10*time.Second, "A's subscriber gets the large uplink", func() bool { return onA.count("m2m/T6/up/big", big) == 1 })
	if onA.count("m2m/T6/up/big", big) != 1 || onB.count("m2m/T6/up/big", big) != 0 {
		t.Errorf("the large uplink: A got %d, B %d; want 1 and 0", onA.count("m2m/T6/up/big", big), onB.count("m2m/T6/up/big", big))
	}
	if got := testutil.ToFloat64(A.up.m.failures.WithLabelValues("too-large")); got != 1 {
		t.Errorf("too-large failures %v, want 1", got)
	}
}
