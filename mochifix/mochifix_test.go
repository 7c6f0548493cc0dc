package mochifix_test

import (
	"bytes"
	"net"
	"sync"
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
		if err := srv.AddListener(listeners.NewNet("t", ln)); err != nil {
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
		go func() { done <- mochifix.Close(srv, []string{"t"}, 10*time.Second) }()
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
