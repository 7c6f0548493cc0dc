// Package mochifix forwards to the public package mochifix, which holds the
// workarounds for mochi-mqtt v2.7.9 (it lived here before embedders needed
// it; the broker and the tests still import it from here).
package mochifix

import (
	"net"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/m2mguard/m2mguard/mochifix"
)

// ErrTimeout is mochifix.ErrTimeout.
var ErrTimeout = mochifix.ErrTimeout

// Close is mochifix.Close.
func Close(server *mqtt.Server, listenerIDs []string, timeout time.Duration, tracked ...*Listener) error {
	return mochifix.Close(server, listenerIDs, timeout, tracked...)
}

// Track is mochifix.Track.
func Track(ln net.Listener) *Listener { return mochifix.Track(ln) }

// Listener is mochifix.Listener.
type Listener = mochifix.Listener
