package fleetroute_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/fleetroute"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/tcptap"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

// guardBroker is a mochi server with the m2mguard hook and the downlink
// routing wired as the broker wires them in fleet mode (without the
// session directory: no takeovers here).
type guardBroker struct {
	srv  *mqtt.Server
	hook *hook.Hook
	d    *fleetroute.Downlinks
	f    *fleet.Fleet
	addr string
}

func startGuardBroker(t *testing.T, node *fleet.Node, id string, svc *keysvc.Service) *guardBroker {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	f, err := fleet.Open(ctx, fleet.Options{URLs: []string{node.ClientURL()}, BrokerID: id, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	b := &guardBroker{f: f, srv: mqtt.New(&mqtt.Options{InlineClient: true, Logger: quiet})}
	b.d, err = fleetroute.NewDownlinks(ctx, fleetroute.DownlinkOptions{Fleet: f, Server: b.srv, Logger: quiet,
		Ready: func(sn string) bool { return b.hook.DownlinkReady(sn) }})
	if err != nil {
		t.Fatal(err)
	}
	b.hook, err = hook.New(hook.Options{Registry: svc, Server: b.srv, Logger: quiet,
		Apps:            hook.AppLimitOptions{Rate: 1e6, RatePerAddr: 1e6, FailuresPerAddr: 1e6},
		OnDownlinkReady: b.d.Wake, OnDownlinksDiscarded: b.d.Requeue})
	if err != nil {
		t.Fatal(err)
	}
	b.addr = serveDownlinks(t, b.srv, id, b.d, b.hook)
	return b
}

// recorder is a TCP proxy that keeps every byte the broker writes.
type recorder struct {
	addr string
	mu   sync.Mutex
	buf  bytes.Buffer
}

func (r *recorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.buf.Write(p)
}

func (r *recorder) bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.buf.Bytes())
}

func record(t *testing.T, broker string) *recorder {
	t.Helper()
	r := &recorder{}
	r.addr = tcptap.Start(t, broker, func(dst io.Writer, src io.Reader) { io.Copy(io.MultiWriter(dst, r), src) })
	return r
}

// TestDownlinksSealedByTheHoldingHook: with the m2mguard hook on two
// brokers sharing one stream, an application's downlink published on one
// reaches a reference terminal (session key) on the other, sealed: the
// terminal opens it, and its plaintext is nowhere in what that broker
// wrote. Published while the terminal is away, downlinks wait, and reach
// it in order on the other broker once its sk is out.
func TestDownlinksSealedByTheHoldingHook(t *testing.T) {
	t.Parallel()
	node := natsNode(t)
	key := make([]byte, 32)
	rand.Read(key)
	store, err := boltstore.Open(filepath.Join(t.TempDir(), "m2mguard.db"), boltstore.Options{MasterKey: key, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	svc, err := keysvc.New(keysvc.Options{Store: store, AppHash: keysvc.AppHashParams{Time: 1, Memory: 1024}})
	if err != nil {
		t.Fatal(err)
	}
	b1 := startGuardBroker(t, node, "b1", svc)
	b2 := startGuardBroker(t, node, "b2", svc)
	tm, err := svc.Register(t.Context(), keysvc.RegisterRequest{SN: "SEALED1", IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		t.Fatal(err)
	}
	pw := []byte("downlink-app-password")
	if _, err := svc.AddApp(t.Context(), keysvc.AddAppRequest{Name: "dash", Password: pw}); err != nil {
		t.Fatal(err)
	}
	o := paho.NewClientOptions().AddBroker("tcp://" + b1.addr).SetClientID("dash-1").SetUsername("dash").
		SetPassword(string(pw)).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	app := paho.NewClient(o)
	if tok := app.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("application: %v", tok.Error())
	}
	t.Cleanup(func() { app.Disconnect(0) })
	down := "m2m/" + tm.SN + "/down/cmd"

	in := &inbox{}
	terminal := func(addr string) *client.Client {
		rec := &client.Record{Identity: tm.Identity(), Alg: tm.Alg, Current: client.Credentials{
			Up: tm.Creds.Up, UpExp: tm.Creds.UpExp, Down: tm.Creds.Down, DownExp: tm.Creds.DownExp, BK: tm.Creds.BK, BKExp: tm.Creds.BKExp}}
		c, err := client.New(client.Config{Brokers: []string{"tcp://" + addr}, Identity: rec.Identity, Alg: rec.Alg,
			Store: client.NewMemStore(rec), SessionKey: true,
			OnData: func(sub string, p []byte) { in.handler(nil, fakeMsg(sub+" "+string(p))) }})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		defer cancel()
		if err := c.Connect(ctx); err != nil {
			t.Fatal(err)
		}
		return c
	}

	// Live, across brokers.
	wire2 := record(t, b2.addr)
	c := terminal(wire2.addr)
	testwait.For(t, 5*time.Second, "b2's session ready", func() bool { return b2.hook.DownlinkReady(tm.SN) })
	publish(t, app, down, "open-the-valve", 1)
	testwait.For(t, 10*time.Second, "the downlink on b2", func() bool { return len(in.got()) == 1 })
	if got := in.got()[0]; got != "cmd open-the-valve" {
		t.Fatalf("terminal received %q", got)
	}
	if bytes.Contains(wire2.bytes(), []byte("open-the-valve")) {
		t.Fatal("b2 wrote the downlink in plaintext")
	}

	// Away, then back on the other broker.
	c.Close()
	testwait.For(t, 5*time.Second, "b2's session not ready", func() bool { return !b2.hook.DownlinkReady(tm.SN) })
	for i := range 3 {
		publish(t, app, down, fmt.Sprintf("queued-%d", i), 1)
	}
	if n := waiting(t, b1.f, tm.SN); n != 3 {
		t.Fatalf("%d downlinks waiting, want 3", n)
	}
	wire1 := record(t, b1.addr)
	terminal(wire1.addr)
	testwait.For(t, 10*time.Second, "the queued downlinks on b1", func() bool { return len(in.got()) == 4 })
	if got := strings.Join(in.got()[1:], ","); got != "cmd queued-0,cmd queued-1,cmd queued-2" {
		t.Fatalf("terminal received %s", got)
	}
	if bytes.Contains(wire1.bytes(), []byte("queued-")) {
		t.Fatal("b1 wrote a queued downlink in plaintext")
	}
	testwait.For(t, 5*time.Second, "the subject empty", func() bool { return waiting(t, b1.f, tm.SN) == 0 })
}

// fakeMsg is a paho.Message with a payload only, for inbox.
type fakeMsg string

func (m fakeMsg) Duplicate() bool   { return false }
func (m fakeMsg) Qos() byte         { return 0 }
func (m fakeMsg) Retained() bool    { return false }
func (m fakeMsg) Topic() string     { return "" }
func (m fakeMsg) MessageID() uint16 { return 0 }
func (m fakeMsg) Payload() []byte   { return []byte(m) }
func (m fakeMsg) Ack()              {}
