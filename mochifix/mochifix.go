// Package mochifix works around known bugs of mochi-mqtt v2.7.9 that a
// server embedding the m2mguard hook would otherwise hit. Today that is one:
// mochi's Server.Close can deadlock (mochi-mqtt/server#488); shut a server
// down with Close instead:
//
//	mochifix.Close(server, []string{"tcp", "ws"}, 10*time.Second)
//
// It stops the listeners (new connections are refused), disconnects every
// client (MQTT 5 clients get 0x8B, server shutting down; a client that does
// not read is closed after a second), then runs mochi's Close, which stops
// the hooks and waits for the clients' goroutines. Close the hook's store
// after it, never before: the hook may still be handling a login or a
// change until mochi's Close returns.
package mochifix

import (
	"errors"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// ErrTimeout: clients were still attached when Close gave up waiting.
var ErrTimeout = errors.New("mochifix: clients still attached after the timeout")

// disconnectWait bounds how long Close waits for the DISCONNECT packets to
// be written: a client that stops reading would block that write.
const disconnectWait = time.Second

// settleWait bounds how long Close waits for a tracked listener's
// accepted connections to reach mochi.
const settleWait = time.Second

// disconnectAll sends every connected client a DISCONNECT (MQTT 5: 0x8B),
// all at once, and after wait closes the sockets of those whose write has
// not finished (closing the socket ends a write stuck on it). The
// goroutines it starts end when their write does, at the latest then.
func disconnectAll(server *mqtt.Server, wait time.Duration) {
	var wg sync.WaitGroup
	var open []*mqtt.Client
	for _, cl := range server.Clients.GetAll() {
		if cl.Net.Inline || cl.Closed() {
			continue
		}
		open = append(open, cl)
		wg.Add(1)
		go func() {
			defer wg.Done()
			server.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return
	case <-time.After(wait):
	}
	for _, cl := range open {
		cl.Stop(packets.ErrServerShuttingDown)
	}
	<-done
}

// Close shuts server down without the deadlock of mochi-mqtt/server#488:
// mochi's Close disconnects clients through Clients.GetByListener, which
// read-locks twice, so a client deleting itself at that moment (a write
// lock) blocks both forever. Close instead marks the listeners closed
// without that callback (mochi's Close then never calls it), lets the
// connections already accepted reach mochi, disconnects every client itself
// (MQTT 5: 0x8B server shutting down; a client that does not read is
// closed after a second), and then calls mochi's Close, which waits for
// them; it gives up after timeout.
//
// listenerIDs are the IDs of the listeners added to server; tracked are
// the Listeners (Track) under them, if any: Close waits (up to a second)
// for the connections they accepted to reach mochi before it calls
// mochi's Close. Without them it gives those connections 20 ms.
func Close(server *mqtt.Server, listenerIDs []string, timeout time.Duration, tracked ...*Listener) error {
	for _, id := range listenerIDs {
		server.Listeners.Close(id, func(string) {}) // stops accepting; mochi's Close will not call back
	}
	// A connection accepted just before is handed to mochi in a goroutine
	// of its own; give it the moment it needs to register.
	time.Sleep(20 * time.Millisecond)
	for _, l := range tracked {
		l.settle(settleWait)
	}
	disconnectAll(server, disconnectWait)
	done := make(chan struct{})
	go func() { server.Close(); close(done) }()
	select {
	case <-done:
		return nil
	case <-time.After(timeout):
		return ErrTimeout
	}
}
