// Package events carries m2mguard's presence and security events to the
// applications of a fleet (docs/EVENTS.md): the versioned JSON schema of an
// Event, the MQTT topics under $m2m/events/ they are published on, a Queue
// that fans them out to their destinations without ever blocking the
// broker, and a Webhook that POSTs them in batches with retries.
//
// The hook (package hook) is the source: it hands each event to a Sink on
// its login paths and read goroutines, so a Sink must not block. Events
// never carry a secret: no password, key, token, digest input, nonce or
// SMS text is ever part of one (the hook's tests scan them).
//
//	q := events.NewQueue(events.QueueOptions{},
//		events.MQTTPublisher(server.Publish), // mochi's inline client
//		webhook.Emit)
//	h, err := hook.New(hook.Options{..., Events: q})
//	...
//	q.Close()
package events

import (
	"encoding/json"
	"strings"
	"time"

	"github.com/m2mguard/m2mguard/codec"
)

// Version is the schema version every Event carries in its "v" field. A
// change that is not backwards compatible (a field renamed, removed or
// given another meaning) raises it; new optional fields and new kinds do
// not.
const Version = 1

// Kind names what happened.
type Kind string

// The kinds of schema version 1.
const (
	// Connected: a terminal logged in and its session is established (its
	// CONNACK is out).
	Connected Kind = "connected"
	// Disconnected: an established session of a terminal ended; Reason
	// says why (see docs/EVENTS.md).
	Disconnected Kind = "disconnected"
	// LoginRefused: a login of a known terminal was refused; Reason is the
	// refusal reason of the broker's log (bad-digest, skew, ...).
	LoginRefused Kind = "login_refused"
	// BindingMismatch: a login of a known terminal came with another IMEI
	// or IMSI than its record; Reason says which changed (imei, imsi,
	// imei+imsi).
	BindingMismatch Kind = "binding_mismatch"
	// ChangeStarted: a credential change started (RID, What, Mode, Origin).
	ChangeStarted Kind = "change_started"
	// ChangeDelivered: the new values of a change were sent (Mode).
	ChangeDelivered Kind = "change_delivered"
	// ChangeCommitted: a change was acknowledged and committed; Reason says
	// by what (ack, login).
	ChangeCommitted Kind = "change_committed"
	// ChangeExpired: a change passed its deadline uncommitted; the old
	// values stay.
	ChangeExpired Kind = "change_expired"
)

// Kinds lists every kind of schema version 1.
func Kinds() []Kind {
	return []Kind{Connected, Disconnected, LoginRefused, BindingMismatch,
		ChangeStarted, ChangeDelivered, ChangeCommitted, ChangeExpired}
}

// Valid reports whether k is a kind of this schema version.
func (k Kind) Valid() bool {
	switch k {
	case Connected, Disconnected, LoginRefused, BindingMismatch,
		ChangeStarted, ChangeDelivered, ChangeCommitted, ChangeExpired:
		return true
	}
	return false
}

// Event is one presence or security event of a terminal. Its JSON form is
// the schema of docs/EVENTS.md. It carries identifiers and reasons, never
// a secret.
type Event struct {
	V      int       `json:"v"`                // Version
	Kind   Kind      `json:"kind"`             // what happened
	SN     string    `json:"sn"`               // the terminal
	Time   time.Time `json:"time"`             // when, UTC, millisecond precision
	Reason string    `json:"reason,omitempty"` // why (disconnected, login_refused, binding_mismatch, change_committed)
	RID    string    `json:"rid,omitempty"`    // change events: the change's id, 16 hex digits
	What   string    `json:"what,omitempty"`   // change_started: pwd, bk or all
	Mode   string    `json:"mode,omitempty"`   // change_started, change_delivered: cipher or sms
	Origin string    `json:"origin,omitempty"` // change_started: operator, terminal or expiry
}

// New returns an event of kind for terminal sn at t, with the schema
// version set and the time in UTC at millisecond precision.
func New(kind Kind, sn string, t time.Time) Event {
	return Event{V: Version, Kind: kind, SN: sn, Time: t.UTC().Truncate(time.Millisecond)}
}

// Marshal returns the JSON form of e.
func (e Event) Marshal() []byte {
	b, _ := json.Marshal(e) // a struct of strings, ints and a time: cannot fail
	return b
}

// TopicPrefix starts every event topic. An application receives events
// only if its subscribe reach holds a filter that starts with it
// (`m2mctl app add --subscribe '$m2m/events/#'`); terminals never do.
const TopicPrefix = "$m2m/events/"

// Topic is the MQTT topic of an event: $m2m/events/<sn>/<kind>.
func Topic(sn string, kind Kind) string { return TopicPrefix + sn + "/" + string(kind) }

// ParseTopic returns the serial number and kind of an event topic: exactly
// four levels, $m2m/events/<sn>/<kind>, with a valid serial number and a
// non-empty kind. A terminal's own $m2m topics ($m2m/<sn>/key, three
// levels, even for a terminal called "events") are not event topics. It
// does not allocate.
func ParseTopic(topic string) (sn string, kind Kind, ok bool) {
	rest, found := strings.CutPrefix(topic, TopicPrefix)
	if !found {
		return "", "", false
	}
	sn, k, found := strings.Cut(rest, "/")
	if !found || !validSN(sn) || k == "" || strings.ContainsAny(k, "/+#") {
		return "", "", false
	}
	return sn, Kind(k), true
}

// validSN is codec.ValidateSN without its error value (which allocates):
// ParseTopic runs in the per-recipient ACL.
func validSN(s string) bool {
	if len(s) < 1 || len(s) > codec.MaxSNLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return false
		}
	}
	return true
}

// IsFilter reports whether an application's topic filter reaches event
// topics: it starts with TopicPrefix.
func IsFilter(filter string) bool { return strings.HasPrefix(filter, TopicPrefix) }

// Sink receives events. The hook calls Emit on its login paths and read
// goroutines: Emit must not block and must not keep e's memory beyond the
// call in a way that changes it.
type Sink interface {
	Emit(e Event)
}

// SinkFunc makes a function a Sink.
type SinkFunc func(Event)

// Emit calls f(e).
func (f SinkFunc) Emit(e Event) { f(e) }

// Multi hands every event to each of its sinks, in order.
type Multi []Sink

// Emit implements Sink.
func (m Multi) Emit(e Event) {
	for _, s := range m {
		s.Emit(e)
	}
}
