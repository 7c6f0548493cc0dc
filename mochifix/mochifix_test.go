package mochifix_test

import (
	"bytes"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/mochifix"
)

// TestCloseWithClientsLeaving closes servers while clients connect and
// leave: each round must finish, without a race report. (The deadlock of
// mochi-mqtt/server#488 needs a client deleted in a window of
// nanoseconds; this test does not hit it reliably. The hook's fault test,
// which kills brokers hundreds of times, hung in 2 of 10 race-detector runs
// with mochi's own Close.)
func TestCloseWithClientsLeaving(t *testing.T) {
	for round := 0; round < 20; round++ {
		srv := mqtt.New(&mqtt.Options{InlineClient: true})
		srv.AddHook(new(auth.AllowHook), nil) // test only: no authentication under test
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		tracked := mochifix.Track(ln)
		if err := srv.AddListener(listeners.NewNet("t", tracked)); err != nil {
			t.Fatal(err)
		}
		go srv.Serve()
		var wg sync.WaitGroup
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				connectAndLeave(ln.Addr().String(), i)
			}()
		}
		time.Sleep(time.Millisecond)
		done := make(chan error, 1)
		go func() { done <- mochifix.Close(srv, []string{"t"}, 10*time.Second, tracked) }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("round %d: Close hangs", round)
		}
		wg.Wait()
	}
}

func connectAndLeave(addr string, i int) {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return
	}
	defer conn.Close()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "c" + string(rune('a'+i))}}
	var buf bytes.Buffer
	pk.ConnectEncode(&buf)
	conn.Write(buf.Bytes())
	conn.SetReadDeadline(time.Now().Add(time.Second))
	b := make([]byte, 4)
	conn.Read(b)
	if i%2 == 0 {
		time.Sleep(time.Duration(i) * 100 * time.Microsecond)
	}
}

// TestCloseWithClientThatDoesNotRead: a client that subscribed and stopped
// reading, whose socket buffers are full, blocks every write to it; Close
// still returns, after closing its socket.
func TestCloseWithClientThatDoesNotRead(t *testing.T) {
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumClientWritesPending = 16
	srv := mqtt.New(&mqtt.Options{InlineClient: true, Capabilities: caps})
	srv.AddHook(new(auth.AllowHook), nil) // test only: no authentication under test
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddListener(listeners.NewNet("t", ln)); err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.(*net.TCPConn).SetReadBuffer(4096)
	var buf bytes.Buffer
	(&packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: "slow"}}).ConnectEncode(&buf)
	(&packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "big"}}}).SubscribeEncode(&buf)
	conn.Write(buf.Bytes())
	ack := make([]byte, 9) // CONNACK (4) + SUBACK (5); then the client reads no more
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(conn, ack); err != nil {
		t.Fatal(err)
	}
	// Fill the client's socket with 64 KiB messages until mochi drops
	// them: its queue of 16 is full, so its write loop is stuck in a write.
	payload := make([]byte, 64<<10)
	for i := 0; atomic.LoadInt64(&srv.Info.MessagesDropped) == 0; i++ {
		if i == 10000 {
			t.Fatal("the client's queue never filled")
		}
		srv.Publish("big", payload, false, 0)
	}
	done := make(chan error, 1)
	go func() { done <- mochifix.Close(srv, []string{"t"}, 10*time.Second) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Close hangs on a client that does not read")
	}
}
