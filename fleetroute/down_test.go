package fleetroute_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/fleetroute"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// natsNode starts a single embedded JetStream node for the test.
func natsNode(t *testing.T) *fleet.Node {
	t.Helper()
	node, err := fleet.StartNode(fleet.NodeOptions{Name: "n1", StoreDir: t.TempDir(), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(node.Shutdown)
	return node
}

// downBroker is a mochi server on loopback with an allow-all auth hook
// and the downlink routing on its own fleet connection. Its terminals are
// ready once they subscribe (the m2mguard hook's part, played by
// readyHook).
type downBroker struct {
	srv  *mqtt.Server
	addr string
	d    *fleetroute.Downlinks
	reg  *prometheus.Registry
	f    *fleet.Fleet
}

func startDownBroker(t *testing.T, node *fleet.Node, id string, tune func(*fleetroute.DownlinkOptions)) *downBroker {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	f, err := fleet.Open(ctx, fleet.Options{URLs: []string{node.ClientURL()}, BrokerID: id, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	b := &downBroker{f: f, reg: prometheus.NewRegistry(),
		srv: mqtt.New(&mqtt.Options{InlineClient: true, Logger: quiet})}
	o := fleetroute.DownlinkOptions{Fleet: f, Server: b.srv, Ready: b.ready, Logger: quiet, Registerer: b.reg}
	if tune != nil {
		tune(&o)
	}
	b.d, err = fleetroute.NewDownlinks(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	b.addr = serveDownlinks(t, b.srv, id, b.d, new(auth.AllowHook), &readyHook{b: b})
	return b
}

// serveDownlinks adds hooks and then d to srv, serves it on a loopback
// listener named id, starts d and returns the listener's address. The
// test's end closes srv, which stops the hooks (Downlinks.Stop).
func serveDownlinks(t *testing.T, srv *mqtt.Server, id string, d *fleetroute.Downlinks, hooks ...mqtt.Hook) string {
	t.Helper()
	for _, h := range append(hooks, d) {
		if err := srv.AddHook(h, nil); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddListener(listeners.NewNet(id, ln)); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// ready: the terminal sn is connected here and subscribed.
func (b *downBroker) ready(sn string) bool {
	cl, ok := b.srv.Clients.Get(sn)
	return ok && !cl.Closed() && len(cl.State.Subscriptions.GetAll()) > 0
}

// readyHook wakes the routing when a client subscribes, as the m2mguard
// hook's Options.OnDownlinkReady does.
type readyHook struct {
	mqtt.HookBase
	b *downBroker
}

func (h *readyHook) ID() string                                               { return "ready" }
func (h *readyHook) Provides(b byte) bool                                     { return b == mqtt.OnSubscribed }
func (h *readyHook) OnSubscribed(cl *mqtt.Client, _ packets.Packet, _ []byte) { h.b.d.Wake(cl.ID) }

// connect connects a 3.1.1 paho client with a persistent session.
func connect(t *testing.T, addr, id string, onMsg paho.MessageHandler) paho.Client {
	t.Helper()
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetCleanSession(false).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second).SetDefaultPublishHandler(onMsg)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("%s: connect: %v", id, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}

func publish(t *testing.T, c paho.Client, topic, payload string, qos byte) {
	t.Helper()
	if tok := c.Publish(topic, qos, false, payload); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("publish %s: %v", topic, tok.Error())
	}
}

// inbox collects the payloads a client receives.
type inbox struct {
	mu   sync.Mutex
	msgs []string
}

func (in *inbox) handler(_ paho.Client, m paho.Message) {
	in.mu.Lock()
	in.msgs = append(in.msgs, string(m.Payload()))
	in.mu.Unlock()
}

func (in *inbox) got() []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]string(nil), in.msgs...)
}

// waiting returns the number of downlinks stored for sn.
func waiting(t *testing.T, f *fleet.Fleet, sn string) uint64 {
	t.Helper()
	js, err := jetstream.New(f.Conn())
	if err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(t.Context(), fleetroute.DownlinkStream)
	if err != nil {
		t.Fatal(err)
	}
	subj := fleetroute.DownlinkPrefix + sn
	info, err := s.Info(t.Context(), jetstream.WithSubjectFilter(subj))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Subjects[subj]
}

// TestDownlinksWaitForTheTerminal: downlinks published while the terminal
// is away are stored, not delivered anywhere; when it is back and ready
// it receives all of them in order, and the stream is empty afterwards.
// More than Queue of them keep the newest, and the drops are counted.
func TestDownlinksWaitForTheTerminal(t *testing.T) {
	t.Parallel()
	node := natsNode(t)
	b := startDownBroker(t, node, "b1", func(o *fleetroute.DownlinkOptions) { o.Queue = 5 })
	const sn = "DOWNWAIT1"
	app := connect(t, b.addr, "app-1", nil)
	for i := range 8 {
		publish(t, app, fmt.Sprintf("m2m/%s/down/cmd", sn), fmt.Sprintf("m%d", i), 1)
	}
	if n := waiting(t, b.f, sn); n != 5 {
		t.Fatalf("%d downlinks stored, want the queue's 5", n)
	}
	if got := counter(t, b.reg, "m2mguard_fleet_route_downlinks_dropped_total"); got != 3 {
		t.Errorf("dropped %v, want 3", got)
	}
	if got := counter(t, b.reg, "m2mguard_fleet_route_downlinks_appended_total"); got != 8 {
		t.Errorf("appended %v, want 8", got)
	}

	in := &inbox{}
	term := connect(t, b.addr, sn, in.handler)
	if tok := term.Subscribe("m2m/"+sn+"/down/#", 1, nil); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	want := []string{"m3", "m4", "m5", "m6", "m7"}
	testwait.For(t, 10*time.Second, "the newest 5 delivered", func() bool { return len(in.got()) >= len(want) })
	if got := in.got(); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("terminal received %v, want %v in order", got, want)
	}
	testwait.For(t, 5*time.Second, "the subject empty", func() bool { return waiting(t, b.f, sn) == 0 })

	// Online now: a new downlink comes at once, through the stream.
	publish(t, app, "m2m/"+sn+"/down/cmd", "live", 1)
	testwait.For(t, 10*time.Second, "the live downlink", func() bool { return len(in.got()) == len(want)+1 })
	if got := in.got(); got[len(got)-1] != "live" {
		t.Fatalf("last received %q, want live", got[len(got)-1])
	}
}

// TestDownlinksAcrossBrokers: an application on one broker reaches a
// terminal on another at once (the kick), and only that broker delivers.
func TestDownlinksAcrossBrokers(t *testing.T) {
	t.Parallel()
	node := natsNode(t)
	b1 := startDownBroker(t, node, "b1", nil)
	b2 := startDownBroker(t, node, "b2", nil)
	const sn = "DOWNACROSS1"
	in := &inbox{}
	term := connect(t, b2.addr, sn, in.handler)
	if tok := term.Subscribe("m2m/"+sn+"/down/#", 1, nil); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	app := connect(t, b1.addr, "app-1", nil)
	for i := range 20 {
		publish(t, app, "m2m/"+sn+"/down/cmd", fmt.Sprintf("m%02d", i), 1)
	}
	testwait.For(t, 10*time.Second, "20 downlinks on the other broker", func() bool { return len(in.got()) >= 20 })
	got := in.got()
	for i, p := range got {
		if want := fmt.Sprintf("m%02d", i); p != want {
			t.Fatalf("message %d is %q, want %q (order per terminal): %v", i, p, want, got)
		}
	}
	if d1, d2 := counter(t, b1.reg, "m2mguard_fleet_route_downlinks_delivered_total"),
		counter(t, b2.reg, "m2mguard_fleet_route_downlinks_delivered_total"); d1 != 0 || d2 != 20 {
		t.Errorf("delivered: publishing broker %v, holding broker %v; want 0 and 20", d1, d2)
	}
	testwait.For(t, 5*time.Second, "the subject empty", func() bool { return waiting(t, b1.f, sn) == 0 })
}

// TestDownlinkRefusedWithoutJetStream: with NATS gone, an application's
// QoS 1 downlink is not acknowledged and its connection ends (it resends
// when back); nothing is delivered locally.
func TestDownlinkRefusedWithoutJetStream(t *testing.T) {
	t.Parallel()
	node := natsNode(t)
	b := startDownBroker(t, node, "b1", func(o *fleetroute.DownlinkOptions) { o.AppendTimeout = 500 * time.Millisecond })
	const sn = "DOWNFAIL1"
	in := &inbox{}
	term := connect(t, b.addr, sn, in.handler)
	if tok := term.Subscribe("m2m/"+sn+"/down/#", 1, nil); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	app := connect(t, b.addr, "app-1", nil)
	node.Shutdown()
	tok := app.Publish("m2m/"+sn+"/down/cmd", 1, false, "lost?")
	testwait.For(t, 10*time.Second, "the application disconnected", func() bool { return !app.IsConnectionOpen() })
	if tok.WaitTimeout(100*time.Millisecond) && tok.Error() == nil {
		t.Error("the publish was acknowledged although JetStream did not store it")
	}
	if got := counter(t, b.reg, "m2mguard_fleet_route_downlinks_failures_total", "append"); got != 1 {
		t.Errorf("append failures %v, want 1", got)
	}
	if len(in.got()) != 0 {
		t.Errorf("delivered locally: %v", in.got())
	}
}

// counter is the value of a counter on reg (one with labels: the child
// with these label values).
func counter(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := len(labels) == len(m.GetLabel())
			for i, l := range m.GetLabel() {
				match = match && l.GetValue() == labels[i]
			}
			if match {
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("no series %s%v", name, labels)
	return 0
}

// TestRequeueAfterMove: the downlinks a broker discards with a moved
// terminal's MQTT session go back into the stream, in the order given,
// and reach the terminal on its new broker.
func TestRequeueAfterMove(t *testing.T) {
	t.Parallel()
	node := natsNode(t)
	b1 := startDownBroker(t, node, "b1", nil)
	b2 := startDownBroker(t, node, "b2", nil)
	const sn = "DOWNREQ1"
	in := &inbox{}
	term := connect(t, b2.addr, sn, in.handler)
	if tok := term.Subscribe("m2m/"+sn+"/down/#", 1, nil); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	var msgs []packets.Packet
	for _, p := range []string{"old-1", "old-2"} {
		msgs = append(msgs, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName: "m2m/" + sn + "/down/cmd", Payload: []byte(p)})
	}
	b1.d.Requeue(sn, msgs)
	testwait.For(t, 10*time.Second, "the requeued downlinks on b2", func() bool { return len(in.got()) >= 2 })
	if got := in.got(); strings.Join(got, ",") != "old-1,old-2" {
		t.Fatalf("received %v", got)
	}
	if got := counter(t, b1.reg, "m2mguard_fleet_route_downlinks_requeued_total"); got != 2 {
		t.Errorf("requeued %v, want 2", got)
	}
}
