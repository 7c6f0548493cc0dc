// Package mochifix works around known bugs of mochi-mqtt v2.7.9 that the
// broker and the tests would otherwise hit.
package mochifix

import (
	"errors"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// ErrTimeout: clients were still attached when Close gave up waiting.
var ErrTimeout = errors.New("mochifix: clients still attached after the timeout")

// Close shuts server down without the deadlock of mochi-mqtt/server#488:
// mochi's Close disconnects clients through Clients.GetByListener, which
// read-locks twice, so a client deleting itself at that moment (a write
// lock) blocks both forever. Close instead marks the listeners closed
// without that callback (mochi's Close then never calls it), lets the
// connections already accepted reach mochi, disconnects every client itself
// (MQTT 5: 0x8B server shutting down), and then calls mochi's Close, which
// waits for them; it gives up after timeout.
//
// listenerIDs are the IDs of the listeners added to server.
func Close(server *mqtt.Server, listenerIDs []string, timeout time.Duration) error {
	for _, id := range listenerIDs {
		server.Listeners.Close(id, func(string) {}) // stops accepting; mochi's Close will not call back
	}
	// A connection accepted just before is handed to mochi in a goroutine
	// of its own; give it the moment it needs to register.
	time.Sleep(20 * time.Millisecond)
	for _, cl := range server.Clients.GetAll() {
		if !cl.Net.Inline && !cl.Closed() {
			server.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	}
	done := make(chan struct{})
	go func() { server.Close(); close(done) }()
	select {
	case <-done:
		return nil
	case <-time.After(timeout):
		return ErrTimeout
	}
}
