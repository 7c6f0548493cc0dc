package hook

import (
	"errors"
	"log/slog"
	"net"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/m2mguard/m2mguard/events"
)

// Presence and security events for applications (package events,
// docs/EVENTS.md). The hook emits them where it decides what they report:
//
//   - connected: OnSessionEstablished (the CONNACK is out);
//   - disconnected: OnDisconnect of an established session, with the
//     reason the hook ended it for, or else what mochi saw
//     (disconnectReason);
//   - login_refused, binding_mismatch: in authTerminal, only once the
//     terminal's record was found (refusedKnown), capped by
//     Options.RefusalEventRate;
//   - change_started, _delivered, _committed, _expired: in the change desk,
//     through changeLink.emit.
//
// Refusals of unknown serial numbers, malformed logins and throttled
// logins (refused before the record is read) give no event: an attacker
// could otherwise fill applications' topics and webhooks with events for
// serial numbers of his choosing. The broker's log and metrics still have
// every one.

// appEvents hands events to Options.Events. Its zero value (no sink) does
// nothing and costs nothing.
type appEvents struct {
	sink     events.Sink
	refusals *rate.Limiter          // login_refused and binding_mismatch
	counts   *prometheus.CounterVec // m2mguard_events_total{kind, result}
	now      func() time.Time       // Options.Now
}

func newAppEvents(sink events.Sink, refusalRate int, counts *prometheus.CounterVec, now func() time.Time) appEvents {
	if sink == nil {
		return appEvents{}
	}
	return appEvents{sink: sink, refusals: rate.NewLimiter(rate.Limit(refusalRate), refusalRate), counts: counts, now: now}
}

// event returns an event of kind for sn, now.
func (a *appEvents) event(kind events.Kind, sn string) events.Event {
	if a.sink == nil {
		return events.Event{}
	}
	return events.New(kind, sn, a.now())
}

// emit hands e to the sink; refusal events only within their budget.
func (a *appEvents) emit(e events.Event) {
	if a.sink == nil {
		return
	}
	if (e.Kind == events.LoginRefused || e.Kind == events.BindingMismatch) && !a.refusals.Allow() {
		a.counts.WithLabelValues(string(e.Kind), "suppressed").Inc()
		return
	}
	a.counts.WithLabelValues(string(e.Kind), "emitted").Inc()
	a.sink.Emit(e)
}

// refusedKnown records the refusal of a login of a terminal whose record
// was found: the log event and metric of refused, and the login_refused
// event for applications.
func (h *Hook) refusedKnown(sn, addr, reason string, attrs ...slog.Attr) {
	h.refused(sn, addr, reason, attrs...)
	e := h.sink.event(events.LoginRefused, sn)
	e.Reason = reason
	h.sink.emit(e)
}

// Reasons of a disconnected event besides those the hook ends sessions
// for (session_ended: key-expired, credentials-changed, administrative,
// disabled, ...).
const (
	disconnectClient    = "client-disconnect" // the terminal sent DISCONNECT
	disconnectTakenOver = "taken-over"        // a new login of the same terminal took the session over
	disconnectShutdown  = "server-shutdown"   // the broker is stopping
	disconnectKeepalive = "keepalive-timeout" // nothing arrived within 1.5 keepalive periods
	disconnectLost      = "connection-lost"   // the connection broke (reset, closed without DISCONNECT, write timeout)
)

// disconnectReason says why an established session ended: the reason the
// hook ended it for (markEnding), else what mochi saw.
func disconnectReason(cl *mqtt.Client, s *session, err error) string {
	if r := s.endReason.Load(); r != nil {
		return *r
	}
	if cl.IsTakenOver() {
		return disconnectTakenOver
	}
	cause := cl.StopCause()
	switch {
	case errors.Is(cause, errShuttingDown), errors.Is(err, errShuttingDown):
		return disconnectShutdown
	case err == nil && errors.Is(cause, errClientDisconnect):
		return disconnectClient
	}
	var ne net.Error
	if err != nil && errors.As(err, &ne) && ne.Timeout() {
		return disconnectKeepalive
	}
	return disconnectLost
}

// The codes disconnectReason looks for, as error values made once (a
// packets.Code costs an allocation each time it becomes an error).
var (
	errShuttingDown     error = packets.ErrServerShuttingDown
	errClientDisconnect error = packets.CodeDisconnect
)

// enabled reports whether events go anywhere: without a sink, OnDisconnect
// need not work out a reason nobody reads.
func (a *appEvents) enabled() bool { return a.sink != nil }
